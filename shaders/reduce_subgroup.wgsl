// Lane and row reductions with subgroup shuffles, for adapters with Features::SUBGROUP.
//
// SUBGROUP_LANES is the adapter's smallest subgroup size. A butterfly whose offsets stay below
// it pairs lanes inside aligned blocks of that size, which lie inside one subgroup whatever
// size the subgroup really has. The merge is exactly commutative, so both partners of every
// exchange compute the same bits and the result is reproducible.

override SUBGROUP_LANES: u32 = 32u;
// Lanes of one row that share a butterfly; blocks of a longer row meet in workgroup memory.
override BUTTERFLY_LANES: u32 = min(LANES_PER_ROW, SUBGROUP_LANES);
override BLOCKS_PER_ROW: u32 = LANES_PER_ROW / BUTTERFLY_LANES;
override BLOCKS: u32 = WORKGROUP_SIZE / SUBGROUP_LANES;

var<workgroup> block_stats: array<RowStats, BLOCKS>;
var<workgroup> block_sums: array<vec4<f32>, BLOCKS>;

fn shuffle_stats(st: RowStats, mask: u32) -> RowStats {
    var out = RowStats(
        subgroupShuffleXor(st.m, mask),
        subgroupShuffleXor(st.s, mask),
        subgroupShuffleXor(st.a, mask),
        subgroupShuffleXor(st.b, mask),
        subgroupShuffleXor(st.h, mask),
        st.e,
        st.best,
        st.best_k,
        st.tally,
        st.mt,
        st.zc,
    );
    if STUDENT_E {
        out.e = subgroupShuffleXor(st.e, mask);
    }
    if TARGET_KIND == TARGET_TEACHER {
        out.mt = subgroupShuffleXor(st.mt, mask);
        out.zc = subgroupShuffleXor(st.zc, mask);
    }
    if METRICS {
        out.best = subgroupShuffleXor(st.best, mask);
        out.best_k = subgroupShuffleXor(st.best_k, mask);
    }
    if TALLY {
        out.tally = subgroupShuffleXor(st.tally, mask);
    }
    return out;
}

// Merges the RowStats of the LANES_PER_ROW consecutive lanes that share a row and hands every
// lane its row's total.
fn reduce_lanes(st: RowStats, lid: u32, lane: u32) -> RowStats {
    var total = st;
    for (var mask = 1u; mask < BUTTERFLY_LANES; mask *= 2u) {
        total = row_stats_merge(total, shuffle_stats(total, mask));
    }
    if BLOCKS_PER_ROW > 1u {
        // A row wider than a block: one value per block, then a tree in workgroup memory.
        let block = lid / BUTTERFLY_LANES;
        if lid % BUTTERFLY_LANES == 0u {
            block_stats[block] = total;
        }
        workgroupBarrier();
        let first = (lid - lane) / BUTTERFLY_LANES;
        let part = block - first;
        for (var stride = BLOCKS_PER_ROW / 2u; stride > 0u; stride /= 2u) {
            if part < stride && lid % BUTTERFLY_LANES == 0u {
                block_stats[block] = row_stats_merge(block_stats[block], block_stats[block + stride]);
            }
            workgroupBarrier();
        }
        total = block_stats[first];
        workgroupBarrier();
    }
    return total;
}

// Σ v over the workgroup, valid in lane 0. May be called again at once: the last barrier
// keeps the next call's writes from racing this call's reads.
fn sum_workgroup(v: vec4<f32>, lid: u32) -> vec4<f32> {
    var total = v;
    for (var mask = 1u; mask < SUBGROUP_LANES; mask *= 2u) {
        total += subgroupShuffleXor(total, mask);
    }
    if BLOCKS > 1u {
        if lid % SUBGROUP_LANES == 0u {
            block_sums[lid / SUBGROUP_LANES] = total;
        }
        workgroupBarrier();
        total = block_sums[0];
        for (var b = 1u; b < BLOCKS; b++) {
            total += block_sums[b];
        }
        workgroupBarrier();
    }
    return total;
}
