// Second pass of the split-row strategy: one lane per row merges the row's SPLIT partial
// RowStats, in part order, and finishes the row.
// Compiled with LANES_PER_ROW = 1, so ROWS_PER_GROUP = WORKGROUP_SIZE.

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
    if group * WORKGROUP_SIZE >= params.rows {
        return;
    }
    let row = group * WORKGROUP_SIZE + lid;
    var sums = RowSums(vec4(0.0), 0.0);
    if row < params.rows {
        var st = load_split_stats(row * SPLIT);
        for (var part = 1u; part < SPLIT; part++) {
            st = row_stats_merge(st, load_split_stats(row * SPLIT + part));
        }
        sums = finish_row(row, st);
    }
    write_group_sum(sums, group, lid);
}
