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
    let group = group_index(wid, groups);
    let lane = lid % LANES_PER_ROW;
    let row = (group / SPLIT) * ROWS_PER_GROUP + lid / LANES_PER_ROW;
    // No early return: every lane must reach the barriers below.
    let live = row < params.rows;
    var st = row_stats_empty();
    if live {
        st = fold_row(row, (group % SPLIT) * LANES_PER_ROW + lane, SPLIT * LANES_PER_ROW);
    }
    st = reduce_lanes(st, lid, lane);
    if SPLIT > 1u {
        if lid == 0u && live {
            split_stats[group] = st;
        }
        return;
    }
    var sums = vec2(0.0);
    if lane == 0u && live {
        sums = finish_row(row, st);
    }
    write_group_sum(sums, group, lid);
}
