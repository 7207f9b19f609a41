// f16 values widened with the core builtin unpack2x16float (every adapter).

fn widen_f16(w: u32) -> vec2<f32> {
    return unpack2x16float(w);
}
