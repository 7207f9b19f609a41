// What every row kernel shares: the strategy constants, the bindings, reading a row's share
// of logits and target weights into RowStats, finishing a row, and the per-workgroup sums.
//
// Rows are numbered within the chunk a dispatch covers (0 ≤ r < params.rows); the chunk's
// first row within the whole call is params.first_row. Per-row results and workgroup sums are
// indexed over the whole call, so a call's outputs do not depend on how it was cut into chunks.

// Strategy (chosen by the dispatch planner, src/gpu/planner.rs).
override WORKGROUP_SIZE: u32 = 256u;
// Consecutive lanes that share one row; a power of two dividing WORKGROUP_SIZE.
override LANES_PER_ROW: u32 = 256u;
override ROWS_PER_GROUP: u32 = WORKGROUP_SIZE / LANES_PER_ROW;
// Workgroups that share one row (then LANES_PER_ROW == WORKGROUP_SIZE); 1 = no split.
override SPLIT: u32 = 1u;
// Aligned 16-byte loads for the body of each row, scalar loads for its ragged ends.
override VEC4: bool = true;

// The logits' dtype (src/gpu/pipelines.rs mirrors these numbers). Every binding of values is
// read as u32 words: an f32 is one word; bf16 and f16 values are two to a word, the element
// with the even index in the low half. bf16 widens by a shift; f16 by `widen_f16`
// (f16_unpack.wgsl or f16_integer.wgsl, prepended by the host).
const DTYPE_F32: u32 = 0u;
const DTYPE_BF16: u32 = 1u;
const DTYPE_F16: u32 = 2u;
override DTYPE: u32 = DTYPE_F32;
// Probability targets in the logits' (half) dtype rather than f32.
override TARGETS_HALF: bool = false;
// Elements of the logits per 16-byte load.
override PER_VEC: u32 = select(4u, 8u, DTYPE != DTYPE_F32);

// What the targets are (src/gpu/pipelines.rs mirrors these numbers).
const TARGET_NONE: u32 = 0u;
const TARGET_CLASS_INDEX: u32 = 1u;
const TARGET_PROBABILITIES: u32 = 2u;
// A teacher's logits, laid out like probabilities (distillation: RowStats, row_stats.wgsl).
const TARGET_TEACHER: u32 = 3u;
// Top-k sparse targets: per row SPARSE_K class indices (i32) then their SPARSE_K
// probabilities (f32), from params.targets_offset (words).
const TARGET_TOP_K: u32 = 4u;
override TARGET_KIND: u32 = TARGET_NONE;
override SPARSE_K: u32 = 0u;
// The high word a top-k row's results carry for a repeated index (an i32 index's high word
// is 0 or 0xffffffff; src/gpu/prepared.rs mirrors it).
const TOP_K_DUPLICATE: u32 = 0x40000000u;
// Against a teacher: 0 the cross-entropy CE(p, q) = H(p) + KL(p‖q), 1 the reverse KL(q‖p),
// 2 the generalised JSD with weight params.beta, in two passes over the logits: the first
// keeps both log-sum-exps per row (GRAD_STATS), the second (JSD_SECOND) sums, per row,
// β·p·(ln p − ln m) + (1−β)·q·(ln q − ln m) with m = β·p + (1−β)·q into RowStats' h, and
// Σ q·d, d = (1−β)·(ln q − ln m), into e (for the gradient). Its parts keep the empty max, so
// every merge is a plain sum.
override DIVERGENCE: u32 = 0u;
override JSD_SECOND: bool = false;
// Per row, the raw RowStats of this block of classes instead of a loss: (m, s, a, b) in the
// per-row results and (h, 0, 0, 0) at params.metrics_at, for a merge elsewhere (shards).
override PARTIALS: bool = false;
// Class indices are i64 (two words, low first) rather than i32.
override INDEX_I64: bool = false;
// A class index equal to (params.ignore_lo, params.ignore_hi) skips its row.
override HAS_IGNORE: bool = false;
// Probability targets lie at the logits' alignment (their element offsets differ by a
// multiple of 4, of 2 for half targets), so four aligned logits have their four targets in
// one vec4 (two words).
override TARGETS_ALIGNED: bool = true;
override HAS_WEIGHTS: bool = false;
override HAS_SMOOTHING: bool = false;
// Accumulate −Σ p̃·ln p̃ (probability targets without class weights).
override ENTROPY: bool = false;
// Logit soft-capping z' = cap·tanh(z / cap) before everything else (params.cap).
override SOFTCAP: bool = false;
// z-loss λ·lse² per counted row (params.z_loss).
override ZLOSS: bool = false;
// Keep (m, ln s, B, counted) per row for a gradient pass.
override GRAD_STATS: bool = false;
// Token metrics of class-index targets in the same pass (RowStats' e, best, tally): per row
// at params.metrics_at (argmax, rank, entropy of the prediction, target log-probability).
override METRICS: bool = false;
// Accumulate the prediction's e = Σ exp(z − m)·(z − m) (its entropy).
override STUDENT_E: bool = METRICS || TARGET_KIND == TARGET_TEACHER;
// Whether each logit carries a target weight a_k inside the loop (the class-index term
// itself is added once per row, in finish_row).
override FOLD_TARGETS: bool = TARGET_KIND == TARGET_PROBABILITIES || (TARGET_KIND == TARGET_CLASS_INDEX && HAS_SMOOTHING);

// Finite logits beyond ±2^64 are refused: differences and weighted sums of them could
// overflow f32 where the f64 reference stays finite (status.out_of_range names the row).
const LOGIT_LIMIT: f32 = 1.8446744e19;
const F32_MAX: f32 = 3.40282347e38;

// One per chunk, at a dynamic offset (src/gpu/prepared.rs, `Params`).
struct Params {
    rows: u32,
    classes: u32,
    // The chunk's first row within the call.
    first_row: u32,
    // Element offset of the chunk's first logit within the logits binding.
    logits_offset: u32,
    // Element offset of the chunk's first target within the targets binding (words for class
    // indices, values for probabilities).
    targets_offset: u32,
    // Global index of the chunk's first workgroup sum, and the call's number of them.
    group_base: u32,
    groups: u32,
    // Where the workgroup sums, the split-row stats and the gradient's row stats start in
    // `results` (vec4 index).
    groups_at: u32,
    split_at: u32,
    rows2_at: u32,
    // Rows of the whole call.
    total_rows: u32,
    // Element offset of the chunk's first output within the outputs binding.
    outputs_offset: u32,
    // Where the per-row upstream gradient starts in `class_weights` (reduction none).
    upstream_at: u32,
    ignore_lo: u32,
    ignore_hi: u32,
    // ε and ε / C (label smoothing)
    smoothing: f32,
    smoothing_per_class: f32,
    // Soft-capping and the z-loss λ.
    cap: f32,
    z_loss: f32,
    // The gradient's scales of the cross-entropy and z-loss terms (gradient.wgsl).
    grad_ce: f32,
    grad_z: f32,
    // Where the per-row token metrics start in `results` (METRICS).
    metrics_at: u32,
    // 1 / T, the temperature of both logits against a teacher.
    inv_temperature: f32,
    // The generalised JSD's weight β.
    beta: f32,
    // A vocabulary shard: these logits are classes class_offset.. class_offset + classes of
    // total_classes (0 and classes unsharded). Class indices are of the whole vocabulary.
    class_offset: u32,
    total_classes: u32,
    // The call's slot among the prepared loss's parameter slots, plus 1; the reduction writes
    // it into the status, so that a read can tell its call's status from an earlier one's.
    call: u32,
    // 1.0, unknown to the compiler (reduce_totals.wgsl, `opaque`).
    one: f32,
    // Where the rows' top-k entries in the gradient's walking order start in `results` (vec4
    // index; TARGET_TOP_K with GRAD_STATS; top_k_order_at).
    order_at: u32,
}

// Written by the kernels, read by the host: errors found on the device and the call's totals
// as unevaluated f32 pairs (hi + lo), finished by reduce_totals.wgsl.
struct Status {
    // 0, or 0xffffffff − r for the first row r whose class index is out of range.
    bad_index: atomic<u32>,
    // 0, or 0xffffffff − r for the first row r with a finite logit beyond ±LOGIT_LIMIT.
    out_of_range: atomic<u32>,
    // The offending class index, low and high words.
    bad_lo: u32,
    bad_hi: u32,
    // (Σ loss, Σ entropy, Σ mean denominator, ignored rows) and (Σ z-loss, 0, 0, 0), high
    // parts then low parts.
    totals_hi: vec4<f32>,
    totals_lo: vec4<f32>,
    totals2_hi: vec4<f32>,
    totals2_lo: vec4<f32>,
    // params.call of the call whose reduction wrote these totals.
    call: u32,
    // 1 once a call found another call's parameters in its slot (own_params); cleared by the
    // host only after a read has seen it, so that it outlives the calls that follow.
    overrun: atomic<u32>,
}

@group(0) @binding(0) var<uniform> params: Params;
// Class weights [C], then (from params.upstream_at) the per-row upstream gradient; its last
// word is the number of the call being run (own_params).
@group(0) @binding(1) var<storage, read> class_weights: array<f32>;
// Three arrays in one binding (a stage may have only 8 storage bindings on some adapters):
// - from 0, per row of the call: (loss, log-sum-exp, entropy of the target, 0); for a row
//   whose class index is out of range, (NaN, lse, index low word, index high word) as bits;
//   without targets, (0, lse, m, ln s);
// - from params.groups_at, per workgroup of the final pass over the call:
//   (Σ loss, Σ entropy, Σ mean denominator, ignored rows);
// - from params.split_at, per (row, part) of a split row within the chunk: its RowStats as
//   three vec4s (store_split_stats);
// - from params.rows2_at, per row of the call, for a gradient pass: (m, ln s, B, counted);
// - from params.metrics_at, per row of the call (METRICS): (argmax, rank or 0xffffffff for an
//   ignored row, entropy of the prediction, log-probability of the target), the first two as
//   u32 bits; the target class then goes in the per-row results' third place, as bits;
// - from params.order_at, per row of the call, for a gradient of top-k targets: the numbers of
//   its entries in the order the gradient walks them, as f32, in whole vec4s (check_top_k).
// Per row the first array holds (cross-entropy, lse, entropy, z-loss); workgroup sums take
// two vec4s each: (Σ loss, Σ entropy, Σ denominator, ignored), (Σ z-loss, 0, 0, 0).
@group(0) @binding(2) var<storage, read_write> results: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> status: Status;
// Logits [rows, classes] of this chunk, row-major, from params.logits_offset: the whole
// 16-byte words of the binding (aligned loads of row bodies), and every word (ragged ends).
// Two views of one buffer, because a binding's last partial vec4 cannot be read as a vec4.
@group(1) @binding(0) var<storage, read> logits: array<vec4<u32>>;
@group(1) @binding(1) var<storage, read> logits1: array<u32>;
// Probabilities laid out like the logits, or one class index per row, from
// params.targets_offset; the same two views.
@group(1) @binding(2) var<storage, read> targets: array<vec4<u32>>;
@group(1) @binding(3) var<storage, read> targets1: array<u32>;
// Elementwise outputs (f32 log-probabilities, the gradient in the logits' dtype), from
// params.outputs_offset; for a gradient in place, a view of the logits themselves.
@group(1) @binding(4) var<storage, read_write> outputs: array<u32>;

// Four logits as the loss sees them: soft-capped (SOFTCAP), divided by the temperature
// against a teacher, else as they are.
//
// Soft-capping is cap·tanh(x), x = z / cap. tanh saturates to ±1 in f32 by |x| = 9, and
// clamping first keeps ±inf from reaching it; a NaN stays NaN (clamp may return a bound).
// Below |x| = 1/4 tanh is its odd series to x⁹ (relative error < 1e-8): a formula's error
// there is absolute, a few ulp of 1, which the cap scales into the logit's absolute error
// (a cap of 1e4 would move every logit by ~1e-3). Above, 1 − 2/(1 + e^{2|x|}) with x's sign:
// one exponential and one reciprocal (the builtin may take two exponentials and a division,
// and x = z · (1/cap) no division: on an H200 the soft-cap's transcendentals, with the
// softmax's exponential, made the gradient 12.5 % slower, 2026-11-28). Its error with a
// correctly rounded exponential is below 9e-8, under one ulp of 1.
fn cap4(z: vec4<f32>) -> vec4<f32> {
    if SOFTCAP {
        let x = clamp(z * (1.0 / params.cap), vec4(-15.0), vec4(15.0));
        let x2 = x * x;
        let series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
        let saturating = sign(x) * (1.0 - 2.0 / (1.0 + exp(2.0 * abs(x))));
        let t = select(saturating, series, abs(x) < vec4(0.25));
        return select(params.cap * t, z, is_nan4(z));
    }
    if TARGET_KIND == TARGET_TEACHER {
        return z * params.inv_temperature;
    }
    return z;
}

fn cap1(z: f32) -> f32 {
    return cap4(vec4(z, 0.0, 0.0, 0.0)).x;
}

// The two values of a word of halves of the logits' dtype, low half first.
fn widen2(w: u32) -> vec2<f32> {
    if DTYPE == DTYPE_BF16 {
        return vec2(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
    }
    return widen_f16(w);
}

// Value i of a binding of the logits' dtype, given its word.
fn element_of(word: u32, i: u32) -> f32 {
    if DTYPE == DTYPE_F32 {
        return bitcast<f32>(word);
    }
    return widen2(word >> ((i & 1u) * 16u)).x;
}

// The word holding value i of a binding of the logits' dtype.
fn word_index(i: u32) -> u32 {
    if DTYPE == DTYPE_F32 {
        return i;
    }
    return i / 2u;
}

// Logit element i of the logits binding.
fn raw_logit(i: u32) -> f32 {
    return element_of(logits1[word_index(i)], i);
}

// Logit element i after soft-capping.
fn logit(i: u32) -> f32 {
    return cap1(raw_logit(i));
}

fn target_word(i: u32) -> u32 {
    return targets1[i];
}

// Whether the parameters in force are the running call's own. The host writes a call's
// parameters into its slot with Queue::write_buffer, which takes effect at the submission, and
// copies the call's number into the last word of `class_weights` in the encoder, just before
// the call's passes. More calls recorded before one submission than there are slots leave an
// early call with a later one's parameters: their numbers differ, and every pass of that call
// does nothing but flag the status (the host turns the flag into an error). Both numbers come
// from uniform and read-only bindings, so a pass may return on this before any barrier.
fn own_params() -> bool {
    let running = bitcast<u32>(class_weights[arrayLength(&class_weights) - 1u]);
    if running == params.call {
        return true;
    }
    atomicStore(&status.overrun, 1u);
    return false;
}

// Records `code` (0xffffffff − global row) in a status word; the smallest row wins.
fn flag_row(r: u32) -> u32 {
    return 0xffffffffu - (params.first_row + r);
}

// The class index of chunk row r as (low, high) words.
fn class_words(r: u32) -> vec2<u32> {
    if INDEX_I64 {
        return vec2(target_word(params.targets_offset + 2u * r), target_word(params.targets_offset + 2u * r + 1u));
    }
    let lo = target_word(params.targets_offset + r);
    return vec2(lo, select(0u, 0xffffffffu, (lo & 0x80000000u) != 0u));
}

// The class index of chunk row r: ≥ 0, −1 for an ignored row, −2 for one out of range (then
// recorded in the status and in the row's results).
fn target_class(r: u32) -> i32 {
    let words = class_words(r);
    let lo = words.x;
    let hi = words.y;
    if HAS_IGNORE && lo == params.ignore_lo && hi == params.ignore_hi {
        return -1;
    }
    if hi != 0u || lo >= params.total_classes {
        atomicMax(&status.bad_index, flag_row(r));
        results[params.first_row + r].z = bitcast<f32>(lo);
        results[params.first_row + r].w = bitcast<f32>(hi);
        return -2;
    }
    return i32(lo);
}

fn class_weight(k: u32) -> f32 {
    if HAS_WEIGHTS {
        return class_weights[k];
    }
    return 1.0;
}

fn class_weights4(k: u32) -> vec4<f32> {
    if HAS_WEIGHTS {
        return vec4(class_weights[k], class_weights[k + 1u], class_weights[k + 2u], class_weights[k + 3u]);
    }
    return vec4(1.0);
}

// Target value j of the targets binding (f32, or the logits' half dtype).
fn target_value(j: u32) -> f32 {
    if TARGETS_HALF {
        return widen2(target_word(j / 2u) >> ((j & 1u) * 16u)).x;
    }
    return bitcast<f32>(target_word(j));
}

// The probability beside logit element i (of the logits binding).
fn probability(i: u32) -> f32 {
    return target_value(i - params.logits_offset + params.targets_offset);
}

// The probabilities beside the four logits from element e (a multiple of 4).
fn probabilities4(e: u32) -> vec4<f32> {
    let j = e - params.logits_offset + params.targets_offset;
    if TARGETS_ALIGNED {
        if TARGETS_HALF {
            return vec4(widen2(target_word(j / 2u)), widen2(target_word(j / 2u + 1u)));
        }
        return bitcast<vec4<f32>>(targets[j / 4u]);
    }
    return vec4(target_value(j), target_value(j + 1u), target_value(j + 2u), target_value(j + 3u));
}

// Effective target weights a_k of the four logits from element e, whose first class is k.
fn target_weights4(e: u32, k: u32) -> vec4<f32> {
    if TARGET_KIND == TARGET_PROBABILITIES {
        let p = probabilities4(e);
        return class_weights4(k) * (p * (1.0 - params.smoothing) + params.smoothing_per_class);
    }
    return class_weights4(k) * params.smoothing_per_class;
}

fn target_weight1(i: u32, k: u32) -> f32 {
    if TARGET_KIND == TARGET_PROBABILITIES {
        return class_weight(k) * (probability(i) * (1.0 - params.smoothing) + params.smoothing_per_class);
    }
    return class_weight(k) * params.smoothing_per_class;
}

// −t·ln t, with 0·ln 0 = 0.
fn entropy_terms(t: vec4<f32>) -> vec4<f32> {
    return select(-t * log(t), vec4(0.0), t <= vec4(0.0));
}

// Effective target weights of the four logits from element e of a row starting at `first`.
// Against a teacher: its four raw logits.
fn targets4(e: u32, first: u32) -> vec4<f32> {
    if FOLD_TARGETS {
        return target_weights4(e, e - first);
    }
    if TARGET_KIND == TARGET_TEACHER {
        return probabilities4(e);
    }
    return vec4(0.0);
}

// Whether any of z is finite and beyond ±LOGIT_LIMIT (soft-capped logits are bounded).
fn wild4(z: vec4<f32>) -> bool {
    if SOFTCAP {
        return false;
    }
    return wild_scaled4(z, z);
}

// Whether any finite logit of `raw` is beyond ±LOGIT_LIMIT as the loss sees it (`scaled`:
// divided by the temperature, where a finite logit may overflow to ±inf at T < 1).
fn wild_scaled4(raw: vec4<f32>, scaled: vec4<f32>) -> bool {
    return any((abs(scaled) > vec4(LOGIT_LIMIT)) & (abs(raw) <= vec4(F32_MAX)));
}

// The (capped) logit of the row's target class, for the rank (METRICS); NaN ranks nothing.
var<private> metric_target: f32;
// The row's (m, ln s, the teacher's lse, ·) from the first pass (JSD_SECOND).
var<private> jsd_row: vec4<f32>;

// ln m of the JSD's mixture m = β·p + (1−β)·q, from ln p and ln q without leaving the log
// domain (the larger term factored out).
fn log_mixture(log_p: vec4<f32>, log_q: vec4<f32>) -> vec4<f32> {
    let a = log(params.beta) + log_p;
    let b = log(1.0 - params.beta) + log_q;
    let top = max(a, b);
    return top + log(exp(a - top) + exp(b - top));
}

// Adds the JSD terms of four classes, student z and teacher t over T (JSD_SECOND): terms
// with p = 0 or q = 0 are 0.
fn fold_jsd4(st: ptr<function, RowStats>, z: vec4<f32>, t: vec4<f32>) {
    let log_q = (z - jsd_row.x) - jsd_row.y;
    let log_p = t - jsd_row.z;
    let log_m = log_mixture(log_p, log_q);
    let p = exp(log_p);
    let q = exp(log_q);
    let tp = select(params.beta * p * (log_p - log_m), vec4(0.0), p == vec4(0.0));
    let d = (1.0 - params.beta) * (log_q - log_m);
    let tq = select(q * d, vec4(0.0), q == vec4(0.0));
    let terms = tp + tq;
    (*st).h += (terms.x + terms.y) + (terms.z + terms.w);
    (*st).e += (tq.x + tq.y) + (tq.z + tq.w);
}

// Folds four logits of classes k.. k + 3 with their target weights t.
fn fold_loaded(st: ptr<function, RowStats>, z: vec4<f32>, t: vec4<f32>, k: u32) -> bool {
    let capped = cap4(z);
    if JSD_SECOND {
        fold_jsd4(st, capped, cap4(t));
        return false;
    }
    if TARGET_KIND == TARGET_TEACHER {
        let teacher = cap4(t);
        *st = raise_teacher(*st, max(max(teacher.x, teacher.y), max(teacher.z, teacher.w)));
        let e = fold4(st, capped, t, false);
        fold_teacher4(st, capped, e, teacher);
        return wild_scaled4(z, capped) || wild_scaled4(t, teacher);
    }
    _ = fold4(st, capped, t, FOLD_TARGETS);
    if METRICS {
        fold_metric4(st, capped, k, metric_target);
    }
    if ENTROPY {
        let h = entropy_terms(t);
        (*st).h += (h.x + h.y) + (h.z + h.w);
    }
    return wild4(z);
}

// Folds the PER_VEC logits of the 16-byte load q, the vec4 v of the logits binding.
fn fold_vector(st: ptr<function, RowStats>, q: vec4<u32>, v: u32, first: u32) -> bool {
    let e = v * PER_VEC;
    if DTYPE == DTYPE_F32 {
        return fold_loaded(st, bitcast<vec4<f32>>(q), targets4(e, first), e - first);
    }
    let lo = fold_loaded(st, vec4(widen2(q.x), widen2(q.y)), targets4(e, first), e - first);
    let hi = fold_loaded(st, vec4(widen2(q.z), widen2(q.w)), targets4(e + 4u, first), e + 4u - first);
    return lo || hi;
}

fn fold_scalar(st: ptr<function, RowStats>, i: u32, k: u32) -> bool {
    var t = 0.0;
    if FOLD_TARGETS {
        t = target_weight1(i, k);
    }
    let z = raw_logit(i);
    let capped = cap1(z);
    if JSD_SECOND {
        let none = vec3(EMPTY_MAX);
        fold_jsd4(st, vec4(capped, none), vec4(cap1(probability(i)), none));
        return false;
    }
    if TARGET_KIND == TARGET_TEACHER {
        let raw = probability(i);
        let teacher = cap1(raw);
        *st = raise_teacher(*st, teacher);
        let e = fold1(st, capped, 0.0, false);
        // The three unused places are −inf on both sides: classes of neither softmax, which
        // add nothing (EMPTY_MAX would weigh 1 while the teacher's max is still EMPTY_MAX).
        let none = vec3(bitcast<f32>(0xff800000u));
        fold_teacher4(st, vec4(capped, none), vec4(e, 0.0, 0.0, 0.0), vec4(teacher, none));
        return wild_scaled4(vec4(z, raw, 0.0, 0.0), vec4(capped, teacher, 0.0, 0.0));
    }
    _ = fold1(st, capped, t, FOLD_TARGETS);
    if METRICS {
        fold_metric(st, capped, k, metric_target);
    }
    if ENTROPY {
        (*st).h += entropy_terms(vec4(t, 0.0, 0.0, 0.0)).x;
    }
    return wild4(vec4(z, 0.0, 0.0, 0.0));
}

// The first logit element of chunk row r.
fn row_first(r: u32) -> u32 {
    return params.logits_offset + r * params.classes;
}

// Folds the elements of chunk row r that fall to `lane` of the `lanes` lanes sharing it (and,
// against top-k targets, checks the lane's share of the row's entries: check_top_k).
// The planner bounds classes / lanes (src/gpu/planner.rs, MAX_ELEMENTS_PER_LANE): some drivers
// end long shader loops early (llvmpipe after 65,535 iterations) or kill long dispatches.
fn fold_row(r: u32, lane: u32, lanes: u32) -> RowStats {
    var st = row_stats_empty();
    var wild = false;
    let first = row_first(r);
    let end = first + params.classes;
    if JSD_SECOND {
        jsd_row = results[params.rows2_at + params.first_row + r];
    }
    if METRICS {
        // NaN for a class out of range (the row then fails) or beyond the row.
        let y = class_words(r);
        metric_target = bitcast<f32>(0x7fc00000u);
        if y.y == 0u && y.x < params.classes {
            metric_target = logit(first + y.x);
        }
    }
    if !VEC4 {
        for (var i = first + lane; i < end; i += lanes) {
            wild = fold_scalar(&st, i, i - first) || wild;
        }
    } else {
        // Whole 16-byte loads inside the row, then the < PER_VEC logits before and after them.
        let v_first = (first + PER_VEC - 1u) / PER_VEC;
        let v_end = max(end / PER_VEC, v_first);
        // Two loads in flight per lane before either is used.
        var v = v_first + lane;
        for (; v + lanes < v_end; v += 2u * lanes) {
            let q0 = logits[v];
            let q1 = logits[v + lanes];
            wild = fold_vector(&st, q0, v, first) || wild;
            wild = fold_vector(&st, q1, v + lanes, first) || wild;
        }
        if v < v_end {
            wild = fold_vector(&st, logits[v], v, first) || wild;
        }
        // A row shorter than the gap to the next aligned load is all head and has no tail.
        let head_end = min(v_first * PER_VEC, end);
        let tail_start = min(max(v_end * PER_VEC, head_end), end);
        let head = head_end - first;
        let ragged = head + (end - tail_start);
        for (var q = lane; q < ragged; q += lanes) {
            let i = select(tail_start + (q - head), first + q, q < head);
            wild = fold_scalar(&st, i, i - first) || wild;
        }
    }
    if wild {
        atomicMax(&status.out_of_range, flag_row(r));
    }
    if TARGET_KIND == TARGET_TOP_K {
        st.tally = check_top_k(r, lane, lanes);
    }
    return st;
}

// What a row adds to its workgroup's sums: (loss, entropy, mean-denominator weight, ignored)
// and its z-loss.
struct RowSums {
    sums: vec4<f32>,
    z_loss: f32,
}

// Completes chunk row r from its merged stats: adds the class-index target term and the
// z-loss, writes the row's results (and, for a gradient, its stats) and returns its sums. An
// ignored row has loss 0 but still gets its log-sum-exp.
fn finish_row(r: u32, st: RowStats) -> RowSums {
    let log_s = log(st.s);
    let lse = st.m + log_s;
    var a = st.a;
    var b = st.b;
    let row = params.first_row + r;
    var counted = 1.0;
    var sums = vec4(0.0);
    var y_class = -1;
    if TARGET_KIND == TARGET_CLASS_INDEX {
        let y = target_class(r);
        y_class = y;
        if y == -1 {
            counted = 0.0;
            b = 0.0;
            results[row] = vec4(0.0, lse, 0.0, 0.0);
            sums = vec4(0.0, 0.0, 0.0, 1.0);
        } else if y < 0 {
            results[row].x = bitcast<f32>(0x7fc00000u);
            results[row].y = lse;
            return failed_row(row);
        } else {
            // The target's own term, where this block of classes holds it (a shard).
            let local = u32(y) - params.class_offset;
            var w_y = 0.0;
            if u32(y) >= params.class_offset && local < params.classes {
                w_y = class_weight(local);
                let w = (1.0 - params.smoothing) * w_y;
                a += w * (logit(row_first(r) + local) - st.m);
                b += w;
            }
            let loss = b * log_s - a;
            sums = vec4(loss, 0.0, w_y, 0.0);
        }
    } else if TARGET_KIND == TARGET_PROBABILITIES {
        sums = vec4(b * log_s - a, st.h, 1.0, 0.0);
    } else if TARGET_KIND == TARGET_TEACHER {
        return finish_teacher_row(r, st, lse, log_s);
    } else if TARGET_KIND == TARGET_TOP_K {
        if st.tally != 0u {
            return failed_top_k_row(r, lse, SPARSE_K - st.tally);
        }
        let first = top_k_first(r);
        for (var j = 0u; j < SPARSE_K; j++) {
            let k = target_word(first + j);
            let p = bitcast<f32>(target_word(first + SPARSE_K + j));
            // p = 0 adds nothing, even on a −inf logit (not 0·(−inf)).
            if p != 0.0 {
                a += p * (logit(row_first(r) + k) - st.m);
            }
            b += p;
        }
        sums = vec4(b * log_s - a, 0.0, 1.0, 0.0);
    }
    var z_loss = 0.0;
    if ZLOSS && counted > 0.0 {
        // Not 0·(λ·lse²) for an ignored row: its lse may be ±inf or NaN.
        z_loss = params.z_loss * lse * lse;
    }
    if TARGET_KIND == TARGET_NONE {
        // Statistics only (log-sum-exp, log-softmax): m and ln s too.
        results[row] = vec4(0.0, lse, st.m, log_s);
    } else if counted > 0.0 {
        results[row] = vec4(sums.x, lse, sums.y, z_loss);
    }
    if GRAD_STATS {
        results[params.rows2_at + row] = vec4(st.m, log_s, b, counted);
    }
    if METRICS && TARGET_KIND == TARGET_CLASS_INDEX {
        write_metrics(r, st, lse, y_class);
    }
    if PARTIALS {
        results[row] = vec4(st.m, st.s, select(a, 0.0, counted == 0.0), b);
        results[params.metrics_at + row] = vec4(st.h, 0.0, 0.0, 0.0);
    }
    return RowSums(sums, z_loss);
}

// The lane of the gradient pass (gradient.wgsl) that writes class k of a row: the element's
// index over the row's lanes (f32), or its output word's (halves, from the row's first word).
struct LaneOwner {
    lanes: u32,
    // Halves: the row's first output element and first word; f32: unused.
    out: u32,
    w_first: u32,
}

// The gradient's lanes of chunk row r. A half row's lanes write the output words whose first
// value is in the row; the chunk's first row also the word holding its first value.
fn row_owner(r: u32) -> LaneOwner {
    let out = params.outputs_offset + r * params.classes;
    let w_first = select((out + 1u) / 2u, out / 2u, r == 0u);
    return LaneOwner(ROW_LANES, out, w_first);
}

fn lane_of(owner: LaneOwner, k: u32) -> u32 {
    if DTYPE == DTYPE_F32 {
        return k % owner.lanes;
    }
    return ((owner.out + k) / 2u - owner.w_first) % owner.lanes;
}

// Whether the row's lanes meet class k at all: a half row's first value may lie in a word the
// previous row's lanes write.
fn lane_meets(owner: LaneOwner, k: u32) -> bool {
    return DTYPE == DTYPE_F32 || (owner.out + k) / 2u >= owner.w_first;
}

// The lane whose walk takes a top-k entry of class k; `lanes` (after every lane) for a class
// out of range or one that the row's lanes do not meet.
fn top_k_lane_of(owner: LaneOwner, k: u32) -> u32 {
    if k >= params.classes || !lane_meets(owner, k) {
        return owner.lanes;
    }
    return lane_of(owner, k);
}

// Whether entry i (class c, on lane l) comes before entry j (class k, on lane m) in the order the
// gradient walks a row's entries: by lane, then by class, then by entry.
fn top_k_before(l: u32, c: u32, i: u32, m: u32, k: u32, j: u32) -> bool {
    return l < m || (l == m && (c < k || (c == k && i < j)));
}

// Checks the top-k entries lane, lane + lanes, … of chunk row r (of the `lanes` lanes that
// share the row) for entries in error: a class out of range, or one that an earlier entry of
// the row already has. Returns the first such entry j of the lane's as SPARSE_K − j, 0 for
// none; the merge keeps the largest (RowStats.tally), which names the row's first.
//
// For a gradient, also writes their places in the order the gradient walks the row's entries
// (top_k_before), each found by comparing the entry with all k. Any targets: a row in error
// still gets its k places, each once.
fn check_top_k(r: u32, lane: u32, lanes: u32) -> u32 {
    let first = top_k_first(r);
    let owner = row_owner(r);
    let at = top_k_order_at(params.first_row + r);
    var fault = 0u;
    for (var j = lane; j < SPARSE_K; j += lanes) {
        let k = target_word(first + j);
        let m = top_k_lane_of(owner, k);
        var place = 0u;
        var repeated = false;
        // Without a gradient only the entries before this one matter.
        let end = select(j, SPARSE_K, GRAD_STATS);
        for (var i = 0u; i < end; i++) {
            let c = target_word(first + i);
            repeated = repeated || (i < j && c == k);
            if GRAD_STATS {
                place += u32(top_k_before(top_k_lane_of(owner, c), c, i, m, k, j));
            }
        }
        if fault == 0u && (k >= params.classes || repeated) {
            fault = SPARSE_K - j;
        }
        if GRAD_STATS {
            // Lanes of the row write words of one vec4: each its own (WGSL's memory locations
            // are scalars).
            let w = at + place;
            results[w / 4u][w % 4u] = f32(j);
        }
    }
    return fault;
}

// A top-k row whose first entry in error is entry j (check_top_k): flags the row and writes
// its results (NaN loss, log-sum-exp, the class index, and in the high word whether it repeats
// an earlier entry's class: an entry in error within range does).
fn failed_top_k_row(r: u32, lse: f32, j: u32) -> RowSums {
    atomicMax(&status.bad_index, flag_row(r));
    let row = params.first_row + r;
    let k = target_word(top_k_first(r) + j);
    let high = select(select(0u, 0xffffffffu, (k & 0x80000000u) != 0u), TOP_K_DUPLICATE, k < params.classes);
    results[row] = vec4(bitcast<f32>(0x7fc00000u), lse, bitcast<f32>(k), bitcast<f32>(high));
    return failed_row(row);
}

// The first targets word of chunk row r's top-k entries: its SPARSE_K class indices, then
// their SPARSE_K probabilities.
fn top_k_first(r: u32) -> u32 {
    return params.targets_offset + r * 2u * SPARSE_K;
}

// The word of `results` where row `row` of the call keeps the numbers of its top-k entries in
// the gradient's walking order (top_k_before), as f32: whole vec4s a row.
fn top_k_order_at(row: u32) -> u32 {
    return params.order_at * 4u + row * ((SPARSE_K + 3u) & ~3u);
}

// What a row whose targets are in error (its results already written) adds: a NaN loss; for
// a gradient pass, NaN statistics of a counted row, so that its gradient is NaN as its loss is
// (not what an earlier call left there).
fn failed_row(row: u32) -> RowSums {
    let nan = bitcast<f32>(0x7fc00000u);
    if GRAD_STATS {
        results[params.rows2_at + row] = vec4(nan, nan, nan, 1.0);
    }
    return RowSums(vec4(nan, 0.0, 0.0, 0.0), 0.0);
}

// Completes chunk row r against a teacher: per row (loss, lse, H(p), KL(p‖q)) for the
// cross-entropy, (KL(q‖p), lse, 0, KL(q‖p)) for the reverse KL; for a gradient
// (m, ln s, the teacher's lse, the loss). Sums (loss, H(p), 1, 0).
fn finish_teacher_row(r: u32, st: RowStats, lse: f32, log_s: f32) -> RowSums {
    let row = params.first_row + r;
    if JSD_SECOND {
        let first = results[params.rows2_at + row];
        let loss = st.h;
        results[row] = vec4(loss, first.x + first.y, 0.0, loss);
        results[params.rows2_at + row].w = st.e;
        return RowSums(vec4(loss, 0.0, 1.0, 0.0), 0.0);
    }
    let log_t = log(st.b);
    var entropy = log_t - st.h / st.b;
    var loss = log_s - st.a / st.b;
    var kl = loss - entropy;
    if DIVERGENCE == 1u {
        loss = (st.e - st.zc) / st.s - log_s + log_t;
        kl = loss;
        entropy = 0.0;
    }
    results[row] = vec4(loss, lse, entropy, kl);
    if GRAD_STATS {
        results[params.rows2_at + row] = vec4(st.m, log_s, st.mt + log_t, loss);
    }
    return RowSums(vec4(loss, entropy, 1.0, 0.0), 0.0);
}

// Writes chunk row r's token metrics (and its target class in the per-row results), given its
// class index (−1 for an ignored row).
fn write_metrics(r: u32, st: RowStats, lse: f32, y: i32) {
    let row = params.first_row + r;
    var rank = 0xffffffffu;
    var log_prob = 0.0;
    if y >= 0 {
        rank = st.tally;
        log_prob = logit(row_first(r) + u32(y)) - lse;
        results[row].z = bitcast<f32>(u32(y));
    }
    let argmax = select(st.best_k, 0u, st.best_k == NO_CLASS);
    let entropy = log(st.s) - st.e / st.s;
    results[params.metrics_at + row] = vec4(bitcast<f32>(argmax), bitcast<f32>(rank), entropy, log_prob);
}

// Sums one value per row of this workgroup into group_sums, in a fixed order (no atomics:
// bit-reproducible). Each row's lane 0 holds its value; every other lane holds 0.
fn write_group_sum(v: RowSums, group: u32, lid: u32) {
    let at = params.groups_at + 2u * (params.group_base + group);
    let total = sum_workgroup(v.sums, lid);
    if lid == 0u {
        results[at] = total;
    }
    if ZLOSS {
        let z = sum_workgroup(vec4(v.z_loss, 0.0, 0.0, 0.0), lid);
        if lid == 0u {
            results[at + 1u] = z;
        }
    }
}

// A split row's part i takes three vec4s: (m, s, a, b), (h, e, best, 0), (best_k, tally, mt,
// zc).
fn store_split_stats(i: u32, st: RowStats) {
    let at = params.split_at + 3u * i;
    results[at] = vec4(st.m, st.s, st.a, st.b);
    results[at + 1u] = vec4(st.h, st.e, st.best, 0.0);
    if TALLY || TARGET_KIND == TARGET_TEACHER {
        results[at + 2u] = vec4(bitcast<f32>(st.best_k), bitcast<f32>(st.tally), st.mt, st.zc);
    }
}

fn load_split_stats(i: u32) -> RowStats {
    let at = params.split_at + 3u * i;
    let x = results[at];
    let y = results[at + 1u];
    var st = RowStats(x.x, x.y, x.z, x.w, y.x, y.y, y.z, NO_CLASS, 0u, EMPTY_MAX, 0.0);
    if TALLY || TARGET_KIND == TARGET_TEACHER {
        let w = results[at + 2u];
        st.best_k = bitcast<u32>(w.x);
        st.tally = bitcast<u32>(w.y);
        st.mt = w.z;
        st.zc = w.w;
    }
    return st;
}

// A lane's row, and the row's stats merged over its lanes: over the whole row, or over this
// workgroup's 1/SPLIT part of it when SPLIT > 1.
struct LaneRow {
    row: u32,
    lane: u32,
    live: bool,
    stats: RowStats,
}

// The first chunk row of a workgroup of the row kernels.
fn group_first_row(group: u32) -> u32 {
    return (group / SPLIT) * ROWS_PER_GROUP;
}

// The chunk row of lane `lid` of a workgroup of the row kernels.
fn lane_row(group: u32, lid: u32) -> u32 {
    return group_first_row(group) + lid / LANES_PER_ROW;
}

// Lane `lid`'s place among the ROW_LANES lanes (of all SPLIT workgroups) that share its row.
fn lane_in_row(group: u32, lid: u32) -> u32 {
    return (group % SPLIT) * LANES_PER_ROW + lid % LANES_PER_ROW;
}

// The lanes that share a row.
override ROW_LANES: u32 = SPLIT * LANES_PER_ROW;

fn gather_row(group: u32, lid: u32) -> LaneRow {
    let lane = lid % LANES_PER_ROW;
    let row = lane_row(group, lid);
    // Lanes past the last row still take part: every lane must reach the reduction's barriers.
    let live = row < params.rows;
    var st = row_stats_empty();
    if live {
        st = fold_row(row, lane_in_row(group, lid), ROW_LANES);
    }
    return LaneRow(row, lane, live, reduce_lanes(st, lid, lane));
}

// The workgroup's index in a 2-D dispatch (more than 65,535 workgroups need the y axis).
fn group_index(wid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wid.x + wid.y * groups.x;
}
