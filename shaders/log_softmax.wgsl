// Log-softmax, after the row statistics: each lane writes its share of a row,
// log q_k = (z_k − m) − ln s, with m and ln s from the row's results (subtracting m first
// keeps large offsets exact), as f32 whatever the logits' dtype. Same grid as the statistics
// pass; no barriers.

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if !own_params() {
        return;
    }
    let group = group_index(wid, groups);
    let r = lane_row(group, lid);
    if r >= params.rows {
        return;
    }
    // (0, lse, m, ln s) for a statistics pass without targets.
    let stats = results[params.first_row + r];
    let first = row_first(r);
    let out = params.outputs_offset + r * params.classes;
    for (var k = lane_in_row(group, lid); k < params.classes; k += ROW_LANES) {
        outputs[out + k] = bitcast<u32>((logit(first + k) - stats.z) - stats.w);
    }
}
