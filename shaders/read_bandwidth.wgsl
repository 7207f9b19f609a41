// The rooflines. Read (COPY false): every lane streams 16-byte loads over the buffer,
// grid-stride, and keeps a sum the compiler cannot drop; nothing else runs, so bytes / time is
// the device's read bandwidth for this access pattern, the same one the loss kernels use.
// Read and write (COPY true): every lane copies the 16-byte words into `sink`, as large as
// `data`; bytes read plus bytes written over the time is the device's rate for a pass that
// reads and writes alike, as the gradient pass does.

override WORKGROUP_SIZE: u32 = 256u;
override COPY: bool = false;

@group(0) @binding(0) var<storage, read> data: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let stride = groups.x * WORKGROUP_SIZE;
    let n = select(arrayLength(&data), min(arrayLength(&data), arrayLength(&sink)), COPY);
    var acc = vec4(0.0);
    for (var i = gid.x; i < n; i += stride) {
        if COPY {
            sink[i] = data[i];
        } else {
            acc += data[i];
        }
    }
    // Never true for finite data, but the compiler cannot know that.
    if !COPY && acc.x == 1.17549e-38 {
        sink[0] = acc;
    }
}
