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
//
// With METRICS (token metrics, rows.wgsl) four more, of the prediction itself:
//   e = Σ exp(z_k − m)·(z_k − m)    (its entropy is ln s − e/s), kept relative to m like a
//   best, best_k                     the largest logit and its class, the lowest class among
//                                    ties, NaN above everything (torch.argmax)
//   tally                            #{k : z_k ranks strictly above the target's logit}
// Without METRICS they stay at their empty values and fold away (but for `tally` against
// top-k targets).
//
// Against top-k targets (TARGET_TOP_K) `tally` marks instead the row's first entry in error
// (a class out of range, or one an earlier entry already has): SPARSE_K − j for entry j, 0
// for none, each lane from its own share of the entries (rows.wgsl, check_top_k). The merge
// keeps the larger, so that it hands the finishing lane the row's first.
//
// Against a teacher (TARGET_TEACHER, distillation) the logits z are the student's divided by
// the temperature, and the target weights are the teacher's unnormalised probabilities
// w_k = exp(t_k − mt), t the teacher's logits over T, mt their running max. Then
//   b = Σ w_k (the teacher's s)     a = Σ w_k·(z_k − m)     h = Σ w_k·(t_k − mt)
//   e = Σ exp(z_k − m)·(z_k − m)    zc = Σ exp(z_k − m)·(t_k − mt)
// and per row H(p) = ln b − h/b, CE(p, q) = ln s − a/b, KL(q‖p) = e/s − ln s − zc/s + ln b.

struct RowStats {
    m: f32,
    s: f32,
    a: f32,
    b: f32,
    h: f32,
    e: f32,
    best: f32,
    best_k: u32,
    tally: u32,
    mt: f32,
    zc: f32,
}

// The max of an empty part. A finite stand-in for −inf, so that the empty part is the
// identity of the merge without special cases: exp(EMPTY_MAX − m) is 0 or 1·s = 0, and
// a −inf logit never becomes the max (exp(−inf − EMPTY_MAX) = 0, not NaN).
const EMPTY_MAX: f32 = -3.40282347e38;

fn row_stats_empty() -> RowStats {
    return RowStats(EMPTY_MAX, 0.0, 0.0, 0.0, 0.0, 0.0, EMPTY_MAX, NO_CLASS, 0u, EMPTY_MAX, 0.0);
}

// The best_k of a part with no logit above EMPTY_MAX (a row of only −inf: argmax 0).
const NO_CLASS: u32 = 0xffffffffu;

// Whether the merge carries `tally`: the count above the target (METRICS) or a top-k row's
// first entry in error.
override TALLY: bool = METRICS || TARGET_KIND == TARGET_TOP_K;

// NaN by its bits: drivers may fold `x != x` away.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// is_nan of each of four values.
fn is_nan4(x: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(x) & vec4(0x7fffffffu)) > vec4(0x7f800000u);
}

fn is_minus_inf(x: f32) -> bool {
    return bitcast<u32>(x) == 0xff800000u;
}

// Whether a ranks strictly above b in torch.argmax's order: NaN above everything, NaNs equal.
fn ranks_above(a: f32, b: f32) -> bool {
    return !is_nan(b) && (is_nan(a) || a > b);
}

// Whether logit z of class k takes the argmax from (best, best_k): it ranks above, or ties
// with a lower class.
fn beats(z: f32, k: u32, best: f32, best_k: u32) -> bool {
    let tie = (is_nan(z) && is_nan(best)) || z == best;
    return ranks_above(z, best) || (tie && k < best_k);
}

// Re-expresses a part's `e` relative to a new max: each term exp(z − m)·(z − m) becomes
// f·exp(z − m_old)·((z − m_old) + (m_old − m_new)) with f = exp(m_old − m_new).
fn rebase_e(e: f32, s: f32, m_old: f32, m_new: f32) -> f32 {
    if m_old == m_new || s == 0.0 {
        return e;
    }
    let f = exp(m_old - m_new);
    return select(f * (e + s * (m_old - m_new)), 0.0, f == 0.0);
}

// Re-expresses a part's `a` relative to a new max. A part with no target mass has nothing
// to move; skipping it also avoids 0·(−inf) when the max jumps by more than f32 range.
fn rebase_a(a: f32, b: f32, m_old: f32, m_new: f32) -> f32 {
    return select(a + b * (m_old - m_new), a, b == 0.0 || m_old == m_new);
}

// A part's stats against the teacher moved to a larger teacher max `mt`: its weights w_k
// shrink by f = exp(mt_old − mt), and every t_k − mt_old becomes (t_k − mt_old) + d.
fn raise_teacher(x: RowStats, mt: f32) -> RowStats {
    var out = x;
    if mt > x.mt {
        let d = x.mt - mt;
        let f = exp(d);
        out.h = rebase_e(x.h, x.b, x.mt, mt);
        // A −inf (p > 0 on a q = 0) stays −inf, even where f underflows.
        out.a = select(x.a * f, x.a, is_minus_inf(x.a));
        out.b = x.b * f;
        out.zc = select(x.zc + x.s * d, x.zc, x.s == 0.0);
        out.mt = mt;
    }
    return out;
}

// A part's zc moved to a larger student max: its exp(z_k − m) shrink by exp(m_old − m_new).
// A −inf (q > 0 on a p = 0) stays −inf.
fn rebase_zc(zc: f32, m_old: f32, m_new: f32) -> f32 {
    if m_old == m_new || is_minus_inf(zc) {
        return zc;
    }
    let f = exp(m_old - m_new);
    return select(zc * f, 0.0, f == 0.0);
}

fn row_stats_merge(x0: RowStats, y0: RowStats) -> RowStats {
    var x = x0;
    var y = y0;
    if TARGET_KIND == TARGET_TEACHER {
        let mt = max(x.mt, y.mt);
        x = raise_teacher(x, mt);
        y = raise_teacher(y, mt);
    }
    let m = max(x.m, y.m);
    let s = x.s * exp(x.m - m) + y.s * exp(y.m - m);
    let a = rebase_a(x.a, x.b, x.m, m) + rebase_a(y.a, y.b, y.m, m);
    var out = RowStats(m, s, a, x.b + y.b, x.h + y.h, 0.0, EMPTY_MAX, NO_CLASS, 0u, EMPTY_MAX, 0.0);
    if STUDENT_E {
        out.e = rebase_e(x.e, x.s, x.m, m) + rebase_e(y.e, y.s, y.m, m);
    }
    if TARGET_KIND == TARGET_TEACHER {
        out.mt = x.mt;
        out.zc = rebase_zc(x.zc, x.m, m) + rebase_zc(y.zc, y.m, m);
    }
    if METRICS {
        let y_wins = beats(y.best, y.best_k, x.best, x.best_k);
        out.best = select(x.best, y.best, y_wins);
        out.best_k = select(x.best_k, y.best_k, y_wins);
    }
    if TALLY {
        out.tally = select(x.tally + y.tally, max(x.tally, y.tally), TARGET_KIND == TARGET_TOP_K);
    }
    return out;
}

// Moves a thread's running stats to a larger max before new elements are added.
fn raise_max(st: ptr<function, RowStats>, m_new: f32) {
    if m_new > (*st).m {
        if STUDENT_E {
            (*st).e = rebase_e((*st).e, (*st).s, (*st).m, m_new);
        }
        if TARGET_KIND == TARGET_TEACHER {
            (*st).zc = rebase_zc((*st).zc, (*st).m, m_new);
        }
        (*st).s *= exp((*st).m - m_new);
        (*st).a = rebase_a((*st).a, (*st).b, (*st).m, m_new);
        (*st).m = m_new;
    }
}

// Folds four logits z with target weights t into the running stats: the thread-level case
// of the merge, written out so that the common path costs one exp per logit; returns the
// exp(z − m) it added. `with_targets` is a pipeline constant at every call site, so the
// branch folds away. 0·(−inf) stays NaN here, as in PyTorch's −Σ p·log_softmax.
fn fold4(st: ptr<function, RowStats>, z: vec4<f32>, t: vec4<f32>, with_targets: bool) -> vec4<f32> {
    raise_max(st, max(max(z.x, z.y), max(z.z, z.w)));
    let e = exp(z - (*st).m);
    (*st).s += (e.x + e.y) + (e.z + e.w);
    if STUDENT_E {
        // A −inf logit has e = 0 and adds nothing (not 0·(−inf)).
        let t = select(e * (z - (*st).m), vec4(0.0), e == vec4(0.0));
        (*st).e += (t.x + t.y) + (t.z + t.w);
    }
    if with_targets {
        (*st).a += dot(t, z - (*st).m);
        (*st).b += (t.x + t.y) + (t.z + t.w);
    }
    return e;
}

fn fold1(st: ptr<function, RowStats>, z: f32, t: f32, with_targets: bool) -> f32 {
    raise_max(st, z);
    let e = exp(z - (*st).m);
    (*st).s += e;
    if STUDENT_E {
        (*st).e += select(e * (z - (*st).m), 0.0, e == 0.0);
    }
    if with_targets {
        (*st).a += t * (z - (*st).m);
        (*st).b += t;
    }
    return e;
}

// Folds logit z of class k into the argmax and the count above `z_target` (METRICS).
fn fold_metric(st: ptr<function, RowStats>, z: f32, k: u32, z_target: f32) {
    if beats(z, k, (*st).best, (*st).best_k) {
        (*st).best = z;
        (*st).best_k = k;
    }
    (*st).tally += u32(ranks_above(z, z_target));
}

// Folds the logits z of classes k.. k + 3 as fold_metric does each, in vector operations: the
// count above the target at once, and the argmax without a branch where none of the four is
// NaN: the largest of the four with its lowest class, against the best so far (the order
// `beats` defines is total on non-NaN values, so this is the scan's result). A lane meets a
// new maximum on most steps of a short row, and a branch that any lane of a warp takes costs
// the whole warp (H200, 2026-11-28: metrics took 2.3× the loss); the scan is kept for NaN.
fn fold_metric4(st: ptr<function, RowStats>, z: vec4<f32>, k: u32, z_target: f32) {
    let nan = is_nan4(z);
    if !is_nan(z_target) {
        let above = select(vec4(0u), vec4(1u), nan | (z > vec4(z_target)));
        (*st).tally += (above.x + above.y) + (above.z + above.w);
    }
    if any(nan) {
        for (var j = 0u; j < 4u; j++) {
            if beats(z[j], k + j, (*st).best, (*st).best_k) {
                (*st).best = z[j];
                (*st).best_k = k + j;
            }
        }
        return;
    }
    let top = max(max(z.x, z.y), max(z.z, z.w));
    let j = select(select(select(3u, 2u, z.z == top), 1u, z.y == top), 0u, z.x == top);
    let take = beats(top, k + j, (*st).best, (*st).best_k);
    (*st).best = select((*st).best, top, take);
    (*st).best_k = select((*st).best_k, k + j, take);
}

// Folds the teacher's four logits t (over T) beside the student's z (over T), whose
// exp(z − m) fold4 just added (TARGET_TEACHER); the caller raised the teacher's max to
// cover t before fold4, while every folded element had its teacher terms.
//
// A class is out of a softmax only where its logit is −inf: a weight that underflows f32 is
// still a positive probability. So a teacher's −inf adds nothing to a and h, a student's −inf
// nothing to zc, and where only the other side is −inf the term is −inf (p > 0 on q = 0, or
// q > 0 on p = 0): never 0·(−inf), and the same whichever order the classes come in.
fn fold_teacher4(st: ptr<function, RowStats>, z: vec4<f32>, e: vec4<f32>, t: vec4<f32>) {
    let w = exp(t - (*st).mt);
    let minus_inf = vec4(bitcast<f32>(0xff800000u));
    let t_out = t == minus_inf;
    let z_out = z == minus_inf;
    let a = select(select(w * (z - (*st).m), minus_inf, z_out), vec4(0.0), t_out);
    let h = select(w * (t - (*st).mt), vec4(0.0), t_out);
    let c = select(select(e * (t - (*st).mt), minus_inf, t_out), vec4(0.0), z_out);
    (*st).b += (w.x + w.y) + (w.z + w.w);
    (*st).a += (a.x + a.y) + (a.z + a.w);
    (*st).h += (h.x + h.y) + (h.z + h.w);
    (*st).zc += (c.x + c.y) + (c.z + c.w);
}
