// f16 values widened with integer operations: exact, and needs no capability. The f16 path
// where unpack2x16float is missing (or a strategy asks for it), and the prelude of modules
// that read no f16 (f32 and bf16 logits), whose DTYPE never calls it.

fn widen_f16_bits(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 31u {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    if e == 0u {
        // Zero or subnormal: m·2^-24, a normal f32 unless zero.
        return select(1.0, -1.0, sign != 0u) * f32(m) * 5.9604645e-8;
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn widen_f16(w: u32) -> vec2<f32> {
    return vec2(widen_f16_bits(w & 0xffffu), widen_f16_bits(w >> 16u));
}
