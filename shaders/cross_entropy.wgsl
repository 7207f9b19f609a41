// Cross-entropy and log-sum-exp in one read of the logits.
//
// Each workgroup takes ROWS_PER_GROUP rows, LANES_PER_ROW lanes to a row (or, with SPLIT > 1,
// one 1/SPLIT share of a single row, finished by merge_split_rows.wgsl). Lanes fold their
// elements into RowStats, the lanes of a row merge, and lane 0 finishes the row.

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
    // Workgroups of the 2-D grid past the last row (the whole workgroup leaves together).
    if group_first_row(group) >= params.rows {
        return;
    }
    let r = gather_row(group, lid);
    if SPLIT > 1u {
        if lid == 0u && r.live {
            store_split_stats(group, r.stats);
        }
        return;
    }
    var sums = RowSums(vec4(0.0), 0.0);
    if r.lane == 0u && r.live {
        sums = finish_row(r.row, r.stats);
    }
    write_group_sum(sums, group, lid);
}
