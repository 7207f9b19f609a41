// f16 values widened with the builtin unpack2x16float: wgpu grants it everywhere but on
// Vulkan's llvmpipe without Features::SHADER_F16 (DeviceFacts::f16_builtin).

fn widen_f16(w: u32) -> vec2<f32> {
    return unpack2x16float(w);
}
