// Log-softmax: the lanes of a row fold it into RowStats, merge, then write
// log q_k = (z_k − m) − ln s (subtracting m first keeps large offsets exact).
// Compiled with TARGET_KIND = none and SPLIT = 1.

@group(0) @binding(7) var<storage, read_write> log_probs: array<f32>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = gather_row(group_index(wid, groups), lid);
    if r.live {
        let log_s = log(r.stats.s);
        let first = r.row * params.classes;
        for (var i = first + r.lane; i < first + params.classes; i += LANES_PER_ROW) {
            log_probs[i] = (logit(i) - r.stats.m) - log_s;
        }
        if r.lane == 0u {
            row_results[r.row] = vec4(0.0, r.stats.m + log_s, 0.0, 0.0);
        }
    }
}
