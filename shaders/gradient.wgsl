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
    // (m, ln s, B, counted)
    let st = results[params.rows2_at + row];
    let lse = st.x + st.y;
    var s_ce = params.grad_ce;
    var s_z = params.grad_z;
    if REDUCTION == REDUCTION_NONE {
        let g = class_weights[params.upstream_at + row];
        s_ce *= g;
        s_z *= g;
    } else if SCALES_FROM_TOTALS {
        let denominator = status.totals_hi.z + status.totals_lo.z;
        let counted = f32(params.total_rows) - (status.totals_hi.w + status.totals_lo.w);
        s_ce /= denominator;
        s_z /= counted;
    }
    var y = -1;
    var w_y = 0.0;
    if TARGET_KIND == TARGET_CLASS_INDEX && st.w > 0.0 {
        y = target_class(r);
        w_y = (1.0 - params.smoothing) * class_weight(u32(max(y, 0)));
    }
    let first = row_first(r);
    let out = params.outputs_offset + r * params.classes;
    let lanes = SPLIT * LANES_PER_ROW;
    for (var k = (group % SPLIT) * LANES_PER_ROW + lid % LANES_PER_ROW; k < params.classes; k += lanes) {
        var z: f32;
        if IN_PLACE {
            z = outputs[out + k];
        } else {
            z = raw_logit(first + k);
        }
        let zc = cap1(z);
        let q = exp((zc - st.x) - st.y);
        var a = 0.0;
        if FOLD_TARGETS {
            a = target_weight1(first + k, k);
        }
        if i32(k) == y {
            a += w_y;
        }
        var g = s_ce * (st.z * q - a);
        if ZLOSS {
            g += s_z * 2.0 * params.z_loss * lse * q;
        }
        if SOFTCAP {
            let t = zc / params.cap;
            g *= 1.0 - t * t;
        }
        // Exactly 0 for an ignored row.
        outputs[out + k] = select(0.0, g, st.w > 0.0);
    }
}
