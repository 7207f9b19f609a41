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
    let group = group_index(wid, groups);
    let lane = lid % LANES_PER_ROW;
    let row = group * ROWS_PER_GROUP + lid / LANES_PER_ROW;
    let live = row < params.rows;
    var st = row_stats_empty();
    if live {
        st = fold_row(row, lane, LANES_PER_ROW);
    }
    st = reduce_lanes(st, lid, lane);
    if live {
        let log_s = log(st.s);
        let first = row * params.classes;
        for (var i = first + lane; i < first + params.classes; i += LANES_PER_ROW) {
            log_probs[i] = (logit(i) - st.m) - log_s;
        }
        if lane == 0u {
            row_results[row] = vec4(0.0, st.m + log_s, 0.0, 0.0);
        }
    }
}
