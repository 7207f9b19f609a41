// What every row kernel shares: the strategy constants, the bindings, reading a row's share
// of logits and target weights into RowStats, finishing a row, and the per-workgroup sums.

// Strategy (chosen by the dispatch planner, src/gpu/planner.rs).
override WORKGROUP_SIZE: u32 = 256u;
// Consecutive lanes that share one row; a power of two dividing WORKGROUP_SIZE.
override LANES_PER_ROW: u32 = 256u;
override ROWS_PER_GROUP: u32 = WORKGROUP_SIZE / LANES_PER_ROW;
// Workgroups that share one row (then LANES_PER_ROW == WORKGROUP_SIZE); 1 = no split.
override SPLIT: u32 = 1u;
// Aligned 16-byte loads for the body of each row, scalar loads for its ragged ends.
override VEC4: bool = true;

// What the targets are (src/gpu/pipelines.rs mirrors these numbers).
const TARGET_NONE: u32 = 0u;
const TARGET_CLASS_INDEX: u32 = 1u;
const TARGET_PROBABILITIES: u32 = 2u;
override TARGET_KIND: u32 = TARGET_NONE;
override HAS_WEIGHTS: bool = false;
override HAS_SMOOTHING: bool = false;
// Accumulate −Σ p̃·ln p̃ (probability targets without class weights).
override ENTROPY: bool = false;
// Whether each logit carries a target weight a_k inside the loop (the class-index term
// itself is added once per row, in finish_row).
override FOLD_TARGETS: bool = TARGET_KIND == TARGET_PROBABILITIES || (TARGET_KIND == TARGET_CLASS_INDEX && HAS_SMOOTHING);

struct Params {
    rows: u32,
    classes: u32,
    // ε and ε / C (label smoothing)
    smoothing: f32,
    smoothing_per_class: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
// Logits [rows, classes] of this chunk, row-major, padded to whole vec4s.
@group(0) @binding(1) var<storage, read> logits: array<vec4<f32>>;
// Probabilities laid out like the logits, or one class index per row (i32 bits, −1 = ignored).
@group(0) @binding(2) var<storage, read> targets: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> class_weights: array<f32>;
// Per row: (loss, log-sum-exp, entropy of the target, 0).
@group(0) @binding(4) var<storage, read_write> row_results: array<vec4<f32>>;
// Per workgroup of the final pass: (Σ loss, Σ entropy) over its rows.
@group(0) @binding(5) var<storage, read_write> group_sums: array<vec2<f32>>;
// Per (row, part) of a split row.
@group(0) @binding(6) var<storage, read_write> split_stats: array<RowStats>;

fn logit(i: u32) -> f32 {
    return logits[i / 4u][i % 4u];
}

fn class_index(row: u32) -> i32 {
    return bitcast<i32>(targets[row / 4u][row % 4u]);
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

// Effective target weights a_k of four logits at element v*4.. whose first class is k.
fn target_weights4(v: u32, k: u32) -> vec4<f32> {
    if TARGET_KIND == TARGET_PROBABILITIES {
        let p = bitcast<vec4<f32>>(targets[v]);
        return class_weights4(k) * (p * (1.0 - params.smoothing) + params.smoothing_per_class);
    }
    return class_weights4(k) * params.smoothing_per_class;
}

fn target_weight1(i: u32, k: u32) -> f32 {
    if TARGET_KIND == TARGET_PROBABILITIES {
        let p = bitcast<f32>(targets[i / 4u][i % 4u]);
        return class_weight(k) * (p * (1.0 - params.smoothing) + params.smoothing_per_class);
    }
    return class_weight(k) * params.smoothing_per_class;
}

// −t·ln t, with 0·ln 0 = 0.
fn entropy_terms(t: vec4<f32>) -> vec4<f32> {
    return select(-t * log(t), vec4(0.0), t <= vec4(0.0));
}

// Effective target weights of the four logits at vec4 index v of a row starting at `first`.
fn targets4(v: u32, first: u32) -> vec4<f32> {
    if FOLD_TARGETS {
        return target_weights4(v, v * 4u - first);
    }
    return vec4(0.0);
}

fn fold_loaded(st: ptr<function, RowStats>, z: vec4<f32>, t: vec4<f32>) {
    fold4(st, z, t, FOLD_TARGETS);
    if ENTROPY {
        let h = entropy_terms(t);
        (*st).h += (h.x + h.y) + (h.z + h.w);
    }
}

fn fold_scalar(st: ptr<function, RowStats>, i: u32, k: u32) {
    var t = 0.0;
    if FOLD_TARGETS {
        t = target_weight1(i, k);
    }
    fold1(st, logit(i), t, FOLD_TARGETS);
    if ENTROPY {
        (*st).h += entropy_terms(vec4(t, 0.0, 0.0, 0.0)).x;
    }
}

// Folds the elements of `row` that fall to `lane` of the `lanes` lanes sharing it.
fn fold_row(row: u32, lane: u32, lanes: u32) -> RowStats {
    var st = row_stats_empty();
    let first = row * params.classes;
    let end = first + params.classes;
    if !VEC4 {
        for (var i = first + lane; i < end; i += lanes) {
            fold_scalar(&st, i, i - first);
        }
        return st;
    }
    // Whole vec4s inside the row, then the ≤ 3 logits before and the ≤ 3 after them.
    let v_first = (first + 3u) / 4u;
    let v_end = max(end / 4u, v_first);
    // Two loads in flight per lane before either is used.
    var v = v_first + lane;
    for (; v + lanes < v_end; v += 2u * lanes) {
        let z0 = logits[v];
        let z1 = logits[v + lanes];
        let t0 = targets4(v, first);
        let t1 = targets4(v + lanes, first);
        fold_loaded(&st, z0, t0);
        fold_loaded(&st, z1, t1);
    }
    if v < v_end {
        fold_loaded(&st, logits[v], targets4(v, first));
    }
    // A row shorter than the gap to the next aligned vec4 is all head and has no tail.
    let head_end = min(v_first * 4u, end);
    let tail_start = min(max(v_end * 4u, head_end), end);
    let head = head_end - first;
    let ragged = head + (end - tail_start);
    for (var r = lane; r < ragged; r += lanes) {
        let i = select(tail_start + (r - head), first + r, r < head);
        fold_scalar(&st, i, i - first);
    }
    return st;
}

// Completes a row from its merged stats: adds the class-index target term, writes the row's
// results and returns its (loss, entropy) for the workgroup sums. An ignored row (class
// index −1) has loss 0 but still gets its log-sum-exp.
fn finish_row(row: u32, st: RowStats) -> vec2<f32> {
    let log_s = log(st.s);
    var a = st.a;
    var b = st.b;
    var loss = 0.0;
    if TARGET_KIND == TARGET_CLASS_INDEX {
        let y = class_index(row);
        if y >= 0 {
            let w = (1.0 - params.smoothing) * class_weight(u32(y));
            a += w * (logit(row * params.classes + u32(y)) - st.m);
            b += w;
            loss = b * log_s - a;
        }
    } else if TARGET_KIND == TARGET_PROBABILITIES {
        loss = b * log_s - a;
    }
    row_results[row] = vec4(loss, st.m + log_s, st.h, 0.0);
    return vec2(loss, st.h);
}

// Sums one (loss, entropy) per row of this workgroup into group_sums[group], in a fixed order
// (no atomics: bit-reproducible). Each row's lane 0 holds its value; every other lane holds 0.
fn write_group_sum(v: vec2<f32>, group: u32, lid: u32) {
    let total = sum_workgroup(v, lid);
    if lid == 0u {
        group_sums[group] = total;
    }
}

// A lane's row, and the row's stats merged over its lanes: over the whole row, or over this
// workgroup's 1/SPLIT part of it when SPLIT > 1.
struct LaneRow {
    row: u32,
    lane: u32,
    live: bool,
    stats: RowStats,
}

fn gather_row(group: u32, lid: u32) -> LaneRow {
    let lane = lid % LANES_PER_ROW;
    let row = (group / SPLIT) * ROWS_PER_GROUP + lid / LANES_PER_ROW;
    // Lanes past the last row still take part: every lane must reach the reduction's barriers.
    let live = row < params.rows;
    var st = row_stats_empty();
    if live {
        st = fold_row(row, (group % SPLIT) * LANES_PER_ROW + lane, SPLIT * LANES_PER_ROW);
    }
    return LaneRow(row, lane, live, reduce_lanes(st, lid, lane));
}

// The workgroup's index in a 2-D dispatch (more than 65,535 workgroups need the y axis).
fn group_index(wid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wid.x + wid.y * groups.x;
}
