// Lane and row reductions through workgroup memory: the fallback where subgroup operations
// are absent. The trees' shapes depend only on the pipeline constants, so results are
// bit-identical from run to run.

var<workgroup> lane_stats: array<RowStats, WORKGROUP_SIZE>;
var<workgroup> row_sums: array<vec4<f32>, WORKGROUP_SIZE>;

// Merges the RowStats of the LANES_PER_ROW consecutive lanes that share a row and hands every
// lane its row's total.
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

// Σ v over the workgroup, valid in lane 0. May be called again at once: only lane 0 reads
// the result, and the next call's first barrier comes before any write it could race.
fn sum_workgroup(v: vec4<f32>, lid: u32) -> vec4<f32> {
    workgroupBarrier();
    row_sums[lid] = v;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            row_sums[lid] += row_sums[lid + stride];
        }
        workgroupBarrier();
    }
    return row_sums[0];
}
