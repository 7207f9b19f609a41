// The gradient of the loss with respect to the logits, after the row statistics:
//   ∂L/∂z_k = [s_ce·(B·q_k − a_k) + s_z·2λ·lse·q_k] · dz'/dz
// with q = softmax(z'), z' the soft-capped logits (dz'/dz = 1 − (z'/cap)²), a_k the effective
// target weights, B = Σ a_k, and the reduction's scales s_ce, s_z (DESIGN.md). Ignored rows get
// exactly 0. Same grid as the statistics pass; each lane writes its share of a row; no barriers.

const REDUCTION_NONE: u32 = 0u;
// The upstream gradient per row (reduction none), or one scalar (sum, mean).
override REDUCTION: u32 = 2u;
// The mean's scales come from the call's totals on the device (else from params).
override SCALES_FROM_TOTALS: bool = false;
// The gradient overwrites the logits: read them through `outputs`.
override IN_PLACE: bool = false;

// What one lane needs to write a row's gradient.
struct RowGradient {
    // (m, ln s, B, counted)
    st: vec4<f32>,
    lse: f32,
    s_ce: f32,
    s_z: f32,
    y: i32,
    w_y: f32,
    first: u32,
}

fn load_logit(g: RowGradient, out: u32, k: u32) -> f32 {
    if IN_PLACE {
        return outputs[out + k];
    }
    return raw_logit(g.first + k);
}

// The gradient of class k of the row from its raw logit z.
fn gradient_of(g: RowGradient, z: f32, k: u32) -> f32 {
    let zc = cap1(z);
    let q = exp((zc - g.st.x) - g.st.y);
    var a = 0.0;
    if FOLD_TARGETS {
        a = target_weight1(g.first + k, k);
    }
    if i32(k) == g.y {
        a += g.w_y;
    }
    var d = g.s_ce * (g.st.z * q - a);
    if ZLOSS {
        d += g.s_z * 2.0 * params.z_loss * g.lse * q;
    }
    if SOFTCAP {
        let t = zc / params.cap;
        d *= 1.0 - t * t;
    }
    // Exactly 0 for an ignored row.
    return select(0.0, d, g.st.w > 0.0);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = group_index(wid, groups);
    let r = group_first_row(group) + lid / LANES_PER_ROW;
    if r >= params.rows {
        return;
    }
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
        g.y = target_class(r);
        g.w_y = (1.0 - params.smoothing) * class_weight(u32(max(g.y, 0)));
    }
    g.first = row_first(r);
    let out = params.outputs_offset + r * params.classes;
    let lane = (group % SPLIT) * LANES_PER_ROW + lid % LANES_PER_ROW;
    let lanes = SPLIT * LANES_PER_ROW;
    // Element by element, four loads in flight per lane, neighbouring lanes on neighbouring
    // elements. (vec4 loads with four scalar stores each measured 1.8x slower on an H200:
    // every store instruction of a warp then touches four times the sectors.)
    let end = params.classes;
    var k = lane;
    for (; k + 3u * lanes < end; k += 4u * lanes) {
        let z0 = load_logit(g, out, k);
        let z1 = load_logit(g, out, k + lanes);
        let z2 = load_logit(g, out, k + 2u * lanes);
        let z3 = load_logit(g, out, k + 3u * lanes);
        outputs[out + k] = gradient_of(g, z0, k);
        outputs[out + k + lanes] = gradient_of(g, z1, k + lanes);
        outputs[out + k + 2u * lanes] = gradient_of(g, z2, k + 2u * lanes);
        outputs[out + k + 3u * lanes] = gradient_of(g, z3, k + 3u * lanes);
    }
    for (; k < end; k += lanes) {
        outputs[out + k] = gradient_of(g, load_logit(g, out, k), k);
    }
}
