// The call's totals from its workgroup sums, on the device, in one workgroup: each lane adds
// a fixed, contiguous stripe of the sums with Neumaier's compensated summation, then the lanes
// merge in a fixed tree with TwoSum. The result is an unevaluated pair hi + lo per quantity
// (loss, entropy, mean denominator, ignored rows), bit-identical from run to run, and within
// about 2·2⁻²⁴·|Σ| + n·2⁻⁴⁸·Σ|x| of the exact sum of the n workgroup sums.
// Also copies the offending class index of the first bad row (if any) into the status, and
// the call's slot number (params.call).

struct Pair {
    hi: vec4<f32>,
    lo: vec4<f32>,
}

// Lanes of the one workgroup, whatever the row kernels' workgroup size (its memory, 8 KiB,
// fits every adapter).
const REDUCE_LANES: u32 = 256u;

var<workgroup> pairs: array<Pair, REDUCE_LANES>;

// A value the compiler cannot see through: times params.one, which is 1.0 at run time.
// Shader compilers may reassociate float arithmetic (WGSL has no `precise`; Mesa's NIR
// rewrites −a + (a + b) to b), which would fold TwoSum's error term to 0.
fn opaque(x: vec4<f32>) -> vec4<f32> {
    return x * params.one;
}

// a + b = s + e exactly (Knuth's TwoSum; no ordering of |a|, |b| needed), with s and
// s − a opaque so that no rewrite of the sum's algebra applies. An infinite (or NaN) s has no
// error term: inf − inf would make a sum of +inf NaN.
fn two_sum(a: vec4<f32>, b: vec4<f32>) -> Pair {
    let s = opaque(a + b);
    let bb = opaque(s - a);
    let e = (a - (s - bb)) + (b - bb);
    let finite = (bitcast<vec4<u32>>(s) & vec4(0x7f800000u)) != vec4(0x7f800000u);
    return Pair(s, select(vec4(0.0), e, finite));
}

fn add_pairs(x: Pair, y: Pair) -> Pair {
    let s = two_sum(x.hi, y.hi);
    return two_sum(s.hi, s.lo + (x.lo + y.lo));
}

// Σ of one of the two vec4s of every workgroup sum (`half` 0 or 1), complete in lane 0.
fn reduce_half(half: u32, lid: u32) -> Pair {
    let n = params.groups;
    let per_lane = (n + REDUCE_LANES - 1u) / REDUCE_LANES;
    let start = min(lid * per_lane, n);
    let end = min(start + per_lane, n);
    var acc = Pair(vec4(0.0), vec4(0.0));
    for (var i = start; i < end; i++) {
        let t = two_sum(acc.hi, results[params.groups_at + 2u * i + half]);
        acc.hi = t.hi;
        acc.lo += t.lo;
    }
    workgroupBarrier();
    pairs[lid] = acc;
    workgroupBarrier();
    for (var stride = REDUCE_LANES / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            pairs[lid] = add_pairs(pairs[lid], pairs[lid + stride]);
        }
        workgroupBarrier();
    }
    return pairs[0];
}

@compute @workgroup_size(REDUCE_LANES)
fn main(@builtin(local_invocation_index) lid: u32) {
    if !own_params() {
        return;
    }
    let first = reduce_half(0u, lid);
    var second = Pair(vec4(0.0), vec4(0.0));
    if ZLOSS {
        second = reduce_half(1u, lid);
    }
    if lid == 0u {
        status.totals_hi = first.hi;
        status.totals_lo = first.lo;
        status.totals2_hi = second.hi;
        status.totals2_lo = second.lo;
        status.call = params.call;
        let bad = atomicLoad(&status.bad_index);
        if bad != 0u {
            let r = results[0xffffffffu - bad];
            status.bad_lo = bitcast<u32>(r.z);
            status.bad_hi = bitcast<u32>(r.w);
        }
    }
}
