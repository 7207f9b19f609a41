// The gradient pass's f32 body (gradient.wgsl's write_row_f32): eight loads in flight per
// lane, then four, in the order of grad_loads2.wgsl (the same bits); a module of its own.

// Writes classes k0, k0 + lanes, … in groups of eight, then four, below `end`; returns the
// first class not written.
fn write_body_f32(g: RowGradient, k0: u32, lanes: u32, end: u32) -> u32 {
    var k = k0;
    for (; k + 7u * lanes < end; k += 8u * lanes) {
        var z: array<f32, 8>;
        for (var j = 0u; j < 8u; j++) {
            z[j] = load_logit(g, k + j * lanes);
        }
        for (var j = 0u; j < 8u; j++) {
            g_store(g, k + j * lanes, z[j]);
        }
    }
    if k + 3u * lanes < end {
        let z0 = load_logit(g, k);
        let z1 = load_logit(g, k + lanes);
        let z2 = load_logit(g, k + 2u * lanes);
        let z3 = load_logit(g, k + 3u * lanes);
        g_store(g, k, z0);
        g_store(g, k + lanes, z1);
        g_store(g, k + 2u * lanes, z2);
        g_store(g, k + 3u * lanes, z3);
        k += 4u * lanes;
    }
    return k;
}
