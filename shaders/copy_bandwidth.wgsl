// The read-and-write roofline: every lane copies 16-byte words from one buffer to another,
// grid-stride, as many bytes written as read. Bytes read plus bytes written over the time is
// the device's rate for a pass that reads and writes alike, as the gradient pass does.

override WORKGROUP_SIZE: u32 = 256u;

@group(0) @binding(0) var<storage, read> data: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let stride = groups.x * WORKGROUP_SIZE;
    let n = min(arrayLength(&data), arrayLength(&sink));
    for (var i = gid.x; i < n; i += stride) {
        sink[i] = data[i];
    }
}
