// The gradient of the loss with respect to the logits, after the row statistics:
//   ∂L/∂z_k = [s_ce·(B·q_k − a_k) + s_z·2λ·lse·q_k] · dz'/dz
// with q = softmax(z'), z' the soft-capped logits (dz'/dz = 1 − (z'/cap)²), a_k the effective
// target weights, B = Σ a_k, and the reduction's scales s_ce, s_z (DESIGN.md). Ignored rows get
// exactly 0. Same grid as the statistics pass; each lane writes its share of a row; no barriers.
//
// The gradient is computed in f32 (the target-class term included) and rounded once to the
// logits' dtype, to nearest, ties to even. Halves are written as whole words: a word is
// written by one lane only, the lane of the row holding its first value, which also computes
// a second value that belongs to the next row (odd C). A word shared with the previous or the
// next chunk (or lying partly outside the view) keeps its other half as it was: chunks run as
// separate dispatches, so such a read-modify-write races with nothing.

const REDUCTION_NONE: u32 = 0u;
// The upstream gradient per row (reduction none), or one scalar (sum, mean).
override REDUCTION: u32 = 2u;
// The mean's scales come from the call's totals on the device (else from params).
override SCALES_FROM_TOTALS: bool = false;
// The gradient overwrites the logits: read them through `outputs`.
override IN_PLACE: bool = false;
// The logits' and the outputs' element offsets have the same parity (halves): the logits of
// an output word are one word of the logits binding.
override PAIRED: bool = true;

// What one lane needs to write a row's gradient.
struct RowGradient {
    // (m, ln s, B, counted)
    st: vec4<f32>,
    lse: f32,
    s_ce: f32,
    s_z: f32,
    y: i32,
    w_y: f32,
    // The row's first logit (logits binding) and first output (outputs binding), elements.
    first: u32,
    out: u32,
    // The row's first top-k word (targets binding) and the first word of its entries in the
    // order of the walk (results, top_k_order_at).
    top_k_at: u32,
    top_k_order: u32,
}

// A lane's walk through its row's top-k entries (TARGET_TOP_K). The statistics pass left the
// entries sorted by the lane that writes their class, then by class: a lane's entries are
// consecutive there and in the order the lane meets its classes. So the lane compares each
// class it meets with its next entry only, and steps to the one after when it meets it, with
// no loop: on llvmpipe (the CI's devices) every loop a class's code reaches costs an
// iteration of the shader's 65,535 even where no lane takes it, and past them the shader's
// loops end silently (a search of the entries per entry met, the old way, did so for long rows
// and more than 32 entries). A repeated class (an error the statistics pass reports) ends the
// lane's walk. The next entry's class (NO_CLASS when none is left) and probability, its place
// in the sorted entries, and who the lane is.
var<private> top_k_next: u32;
var<private> top_k_next_p: f32;
var<private> top_k_place: u32;
var<private> top_k_lane: u32;
var<private> top_k_owner: LaneOwner;

// Starts the walk of `lane` through row g's entries: they follow those of the lanes before it.
fn top_k_begin(g: RowGradient, lane: u32, owner: LaneOwner) {
    if TARGET_KIND != TARGET_TOP_K {
        return;
    }
    top_k_lane = lane;
    top_k_owner = owner;
    var place = 0u;
    for (var j = 0u; j < SPARSE_K; j++) {
        place += u32(top_k_lane_of(top_k_owner, target_word(g.top_k_at + j)) < lane);
    }
    top_k_place = place;
    top_k_load(g);
}

// Takes the entry at the walk's place as its next, if it is the lane's.
fn top_k_load(g: RowGradient) {
    top_k_next = NO_CLASS;
    top_k_next_p = 0.0;
    if top_k_place < SPARSE_K {
        let w = g.top_k_order + top_k_place;
        let j = min(u32(results[w / 4u][w % 4u]), SPARSE_K - 1u);
        let k = target_word(g.top_k_at + j);
        if top_k_lane_of(top_k_owner, k) == top_k_lane {
            top_k_next = k;
            top_k_next_p = bitcast<f32>(target_word(g.top_k_at + SPARSE_K + j));
        }
    }
}

// The target weight of class k of the lane's row, from its walk through the row's entries.
fn top_k_weight(g: RowGradient, k: u32) -> f32 {
    if TARGET_KIND != TARGET_TOP_K || k != top_k_next {
        return 0.0;
    }
    let p = top_k_next_p;
    top_k_place++;
    top_k_load(g);
    return p;
}

// The target weight of class k of row g from all its entries: for a class that a lane meets
// outside its row's walk (the next row's first value, in a word the lane's row shares).
fn top_k_scan(g: RowGradient, k: u32) -> f32 {
    var a = 0.0;
    for (var j = 0u; j < SPARSE_K; j++) {
        if target_word(g.top_k_at + j) == k {
            a += bitcast<f32>(target_word(g.top_k_at + SPARSE_K + j));
        }
    }
    return a;
}

// The gradient context of chunk row r.
fn row_gradient(r: u32) -> RowGradient {
    let row = params.first_row + r;
    var g: RowGradient;
    g.st = results[params.rows2_at + row];
    g.lse = g.st.x + g.st.y;
    g.s_ce = params.grad_ce;
    g.s_z = params.grad_z;
    if REDUCTION == REDUCTION_NONE {
        let up = class_weights[params.upstream_at + row];
        g.s_ce *= up;
        g.s_z *= up;
    } else if SCALES_FROM_TOTALS {
        let denominator = status.totals_hi.z + status.totals_lo.z;
        let counted = f32(params.total_rows) - (status.totals_hi.w + status.totals_lo.w);
        g.s_ce /= denominator;
        g.s_z /= counted;
    }
    g.y = -1;
    g.w_y = 0.0;
    if TARGET_KIND == TARGET_CLASS_INDEX && g.st.w > 0.0 {
        // The class within this block of classes (a shard holds some of them).
        let y = u32(target_class(r)) - params.class_offset;
        if y < params.classes {
            g.y = i32(y);
            g.w_y = (1.0 - params.smoothing) * class_weight(y);
        }
    }
    g.first = row_first(r);
    g.out = params.outputs_offset + r * params.classes;
    g.top_k_at = top_k_first(r);
    g.top_k_order = top_k_order_at(row);
    return g;
}

// Raw logit k of the row (f32 logits).
fn load_logit(g: RowGradient, k: u32) -> f32 {
    if IN_PLACE {
        return bitcast<f32>(outputs[g.out + k]);
    }
    return raw_logit(g.first + k);
}

// The gradient of class k of the row from its raw logit z, on the lane's walk of the row's
// top-k entries.
fn gradient_of(g: RowGradient, z: f32, k: u32) -> f32 {
    return gradient_with(g, z, k, top_k_weight(g, k));
}

// The gradient of class k of the row from its raw logit z, whose top-k target weight is
// `top_k`.
fn gradient_with(g: RowGradient, z: f32, k: u32, top_k: f32) -> f32 {
    let zc = cap1(z);
    if TARGET_KIND == TARGET_TEACHER {
        return teacher_gradient(g, zc, k);
    }
    let q = exp((zc - g.st.x) - g.st.y);
    var a = 0.0;
    if FOLD_TARGETS {
        a = target_weight1(g.first + k, k);
    }
    if i32(k) == g.y {
        a += g.w_y;
    }
    if TARGET_KIND == TARGET_TOP_K {
        a += top_k;
    }
    var d = g.s_ce * (g.st.z * q - a);
    if ZLOSS {
        d += g.s_z * 2.0 * params.z_loss * g.lse * q;
    }
    if SOFTCAP {
        let t = zc * (1.0 / params.cap);
        d *= 1.0 - t * t;
    }
    // Exactly 0 for an ignored row.
    return select(0.0, d, g.st.w > 0.0);
}

// Against a teacher, with g.st = (m, ln s, the teacher's lse, the loss) and s = z/T: the
// gradient with respect to s, q − p for the cross-entropy, q·((ln q − ln p) − KL(q‖p)) for
// the reverse KL (exactly 0 where q = 0); params.grad_ce carries 1/T and the loss scale.
fn teacher_gradient(g: RowGradient, s: f32, k: u32) -> f32 {
    let log_q = (s - g.st.x) - g.st.y;
    let q = exp(log_q);
    let log_p = cap1(probability(g.first + k)) - g.st.z;
    if DIVERGENCE == 2u {
        // JSD: q·(d − Σ q·d), d = (1−β)·(ln q − ln m); g.st.w is Σ q·d.
        let log_m = log_mixture(vec4(log_p), vec4(log_q)).x;
        let d = (1.0 - params.beta) * (log_q - log_m);
        return g.s_ce * select(q * (d - g.st.w), 0.0, q == 0.0);
    }
    if DIVERGENCE == 1u {
        return g.s_ce * select(q * ((log_q - log_p) - g.st.w), 0.0, q == 0.0);
    }
    return g.s_ce * (q - exp(log_p));
}

// f32 → bf16 bits, to nearest, ties to even (NaN stays a quiet NaN).
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// f32 → f16 bits, to nearest, ties to even, subnormals included (in integer arithmetic, so
// the rounding is the same on every adapter).
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if a > 0x7f800000u {
        return sign | 0x7e00u;
    }
    // 65520 and above (halfway past 65504, the largest f16) round to infinity.
    if a >= 0x477ff000u {
        return sign | 0x7c00u;
    }
    // Normal f16 (2^-14 and above): rebias the exponent, round at bit 13.
    if a >= 0x38800000u {
        return sign | (((a + 0xfffu + ((a >> 13u) & 1u)) >> 13u) - (112u << 10u));
    }
    // Below half the smallest subnormal (2^-25, a tie, included): zero.
    if a <= 0x33000000u {
        return sign;
    }
    // Subnormal: the mantissa with its leading 1, in units of 2^-24.
    let e = a >> 23u;
    let m = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - e;
    let half_unit = 1u << (shift - 1u);
    let rest = m & ((half_unit << 1u) - 1u);
    var q = m >> shift;
    if rest > half_unit || (rest == half_unit && (q & 1u) == 1u) {
        q += 1u;
    }
    return sign | q;
}

// A gradient value as the 16 bits of the logits' dtype.
fn half_bits(x: f32) -> u32 {
    if DTYPE == DTYPE_BF16 {
        return bf16_bits(x);
    }
    return f16_bits(x);
}

// f32 logits: element by element, four loads in flight per lane, neighbouring lanes on
// neighbouring elements. (vec4 loads with four scalar stores each measured 1.8x slower on an
// H200: every store instruction of a warp then touches four times the sectors.)
fn write_row_f32(r: u32, g: RowGradient, lane: u32, lanes: u32) {
    top_k_begin(g, lane, row_owner(r));
    let end = params.classes;
    var k = lane;
    for (; k + 3u * lanes < end; k += 4u * lanes) {
        let z0 = load_logit(g, k);
        let z1 = load_logit(g, k + lanes);
        let z2 = load_logit(g, k + 2u * lanes);
        let z3 = load_logit(g, k + 3u * lanes);
        g_store(g, k, z0);
        g_store(g, k + lanes, z1);
        g_store(g, k + 2u * lanes, z2);
        g_store(g, k + 3u * lanes, z3);
    }
    for (; k < end; k += lanes) {
        g_store(g, k, load_logit(g, k));
    }
}

// The gradient of class k from its logit z (f32).
fn g_store(g: RowGradient, k: u32, z: f32) {
    outputs[g.out + k] = bitcast<u32>(gradient_of(g, z, k));
}

// The two logits of interior output word w (elements 2w, 2w + 1 of the outputs binding).
fn load_pair(g: RowGradient, w: u32) -> vec2<f32> {
    if IN_PLACE {
        return widen2(outputs[w]);
    }
    let i = g.first + (2u * w - g.out);
    if PAIRED {
        return widen2(logits1[i / 2u]);
    }
    return vec2(raw_logit(i), raw_logit(i + 1u));
}

// Halves: the lanes of chunk row r walk the output words the row owns, lane l the words
// w_first + l, + lanes, …: the interior words (both values in the row) four in flight, a
// word the row shares with the previous or the next row one value at a time.
fn write_row_half(r: u32, g: RowGradient, lane: u32, lanes: u32) {
    let o = g.out;
    let end = o + params.classes;
    // Words whose first value is in the row, and for the chunk's first row the word holding
    // its first value.
    let owner = row_owner(r);
    let w_first = owner.w_first;
    top_k_begin(g, lane, owner);
    let w_end = (end + 1u) / 2u;
    // The interior words: from the first starting at or after the row's first value to the
    // last ending inside the row.
    let w_lo = (o + 1u) / 2u;
    let w_hi = max(end / 2u, w_lo);
    var w = w_first + lane;
    // The chunk's first row may start inside a word (w_first = w_lo − 1, lane 0's).
    if w < w_lo && w < w_end {
        write_edge_word(r, g, w);
        w += lanes;
    }
    // Four words loaded, then written in a loop of constant length (one inlined copy of the
    // gradient: shader compilers take time per copy).
    for (; w + 3u * lanes < w_hi; w += 4u * lanes) {
        let z = load_pairs4(g, w, lanes);
        for (var j = 0u; j < 4u; j++) {
            write_pair(g, w + j * lanes, z[j]);
        }
    }
    for (; w < w_hi; w += lanes) {
        write_pair(g, w, load_pair(g, w));
    }
    // A word ending past the row (an odd end): its first value is the row's last.
    if w < w_end {
        write_edge_word(r, g, w);
    }
}

// The logits of interior words w, w + lanes, w + 2·lanes, w + 3·lanes (one per column).
fn load_pairs4(g: RowGradient, w: u32, lanes: u32) -> mat4x2<f32> {
    return mat4x2(
        load_pair(g, w),
        load_pair(g, w + lanes),
        load_pair(g, w + 2u * lanes),
        load_pair(g, w + 3u * lanes),
    );
}

// Interior output word w of the row, whose logits are z.
fn write_pair(g: RowGradient, w: u32, z: vec2<f32>) {
    let k = 2u * w - g.out;
    let lo = half_bits(gradient_of(g, z.x, k));
    let hi = half_bits(gradient_of(g, z.y, k + 1u));
    outputs[w] = lo | (hi << 16u);
}

// A word at the row's start (the chunk's first row) or end: each value from its own row, or
// kept.
fn write_edge_word(r: u32, g: RowGradient, w: u32) {
    let o = g.out;
    let e = 2u * w;
    let old = outputs[w];
    var lo = old & 0xffffu;
    var hi = old >> 16u;
    if e >= o {
        let k = e - o;
        lo = half_bits(gradient_of(g, load_one(g, k, old, 0u), k));
        if r + 1u < params.rows {
            let n = row_gradient(r + 1u);
            hi = half_bits(gradient_with(n, load_one(n, 0u, old, 1u), 0u, top_k_scan(n, 0u)));
        }
    } else {
        hi = half_bits(gradient_of(g, load_one(g, 0u, old, 1u), 0u));
    }
    outputs[w] = lo | (hi << 16u);
}

// The raw logit of class k of the row; `old` is the output word and `half` which half of it
// holds that logit in place.
fn load_one(g: RowGradient, k: u32, old: u32, half: u32) -> f32 {
    if IN_PLACE {
        return widen2(old >> (16u * half)).x;
    }
    return raw_logit(g.first + k);
}

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
    let g = row_gradient(r);
    let lane = lane_in_row(group, lid);
    if DTYPE == DTYPE_F32 {
        write_row_f32(r, g, lane, ROW_LANES);
    } else {
        write_row_half(r, g, lane, ROW_LANES);
    }
}
