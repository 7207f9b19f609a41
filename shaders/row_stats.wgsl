// RowStats: the one statistic behind every loss here (DESIGN.md, "One pass, one statistic").
//
// For a part of a row with logits z_k and effective target weights a_k:
//   m = max z_k                 s = Σ exp(z_k − m)
//   a = Σ a_k·(z_k − m)         b = Σ a_k             h = −Σ p_k·ln p_k (target entropy)
// The row's log-sum-exp is m + ln s and its loss is b·ln s − a.
//
// `a` is kept relative to the running max rather than as Σ a_k·z_k: a constant offset of 1e6
// on the logits would otherwise cancel catastrophically in b·lse − a (f32 ulp at 1e6 is 0.06).
//
// The same merge serves a thread's loop, the lanes of a row, a row split across workgroups,
// and (on the host) chunks or shards.

struct RowStats {
    m: f32,
    s: f32,
    a: f32,
    b: f32,
    h: f32,
}

// The max of an empty part. A finite stand-in for −inf, so that the empty part is the
// identity of the merge without special cases: exp(EMPTY_MAX − m) is 0 or 1·s = 0, and
// a −inf logit never becomes the max (exp(−inf − EMPTY_MAX) = 0, not NaN).
const EMPTY_MAX: f32 = -3.40282347e38;

fn row_stats_empty() -> RowStats {
    return RowStats(EMPTY_MAX, 0.0, 0.0, 0.0, 0.0);
}

// Re-expresses a part's `a` relative to a new max. A part with no target mass has nothing
// to move; skipping it also avoids 0·(−inf) when the max jumps by more than f32 range.
fn rebase_a(a: f32, b: f32, m_old: f32, m_new: f32) -> f32 {
    return select(a + b * (m_old - m_new), a, b == 0.0 || m_old == m_new);
}

fn row_stats_merge(x: RowStats, y: RowStats) -> RowStats {
    let m = max(x.m, y.m);
    let s = x.s * exp(x.m - m) + y.s * exp(y.m - m);
    let a = rebase_a(x.a, x.b, x.m, m) + rebase_a(y.a, y.b, y.m, m);
    return RowStats(m, s, a, x.b + y.b, x.h + y.h);
}

// Moves a thread's running stats to a larger max before new elements are added.
fn raise_max(st: ptr<function, RowStats>, m_new: f32) {
    if m_new > (*st).m {
        (*st).s *= exp((*st).m - m_new);
        (*st).a = rebase_a((*st).a, (*st).b, (*st).m, m_new);
        (*st).m = m_new;
    }
}

// Folds four logits z with target weights t into the running stats: the thread-level case
// of the merge, written out so that the common path costs one exp per logit.
// `with_targets` is a pipeline constant at every call site, so the branch folds away.
// 0·(−inf) stays NaN here, as in PyTorch's −Σ p·log_softmax.
fn fold4(st: ptr<function, RowStats>, z: vec4<f32>, t: vec4<f32>, with_targets: bool) {
    raise_max(st, max(max(z.x, z.y), max(z.z, z.w)));
    let e = exp(z - (*st).m);
    (*st).s += (e.x + e.y) + (e.z + e.w);
    if with_targets {
        (*st).a += dot(t, z - (*st).m);
        (*st).b += (t.x + t.y) + (t.z + t.w);
    }
}

fn fold1(st: ptr<function, RowStats>, z: f32, t: f32, with_targets: bool) {
    raise_max(st, z);
    (*st).s += exp(z - (*st).m);
    if with_targets {
        (*st).a += t * (z - (*st).m);
        (*st).b += t;
    }
}
