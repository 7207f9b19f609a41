// Lane reduction through workgroup memory: the fallback where subgroup operations are absent.
//
// Merges the RowStats of the LANES_PER_ROW consecutive lanes that share a row and hands every
// lane its row's total. The tree's shape depends only on the pipeline constants, so the
// result is bit-identical from run to run.

var<workgroup> lane_stats: array<RowStats, WORKGROUP_SIZE>;

fn reduce_lanes(st: RowStats, lid: u32, lane: u32) -> RowStats {
    lane_stats[lid] = st;
    workgroupBarrier();
    for (var stride = LANES_PER_ROW / 2u; stride > 0u; stride /= 2u) {
        if lane < stride {
            lane_stats[lid] = row_stats_merge(lane_stats[lid], lane_stats[lid + stride]);
        }
        workgroupBarrier();
    }
    let total = lane_stats[lid - lane];
    // The caller may reduce again; nobody may overwrite lane_stats before all have read it.
    workgroupBarrier();
    return total;
}
