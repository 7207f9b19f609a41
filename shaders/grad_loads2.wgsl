// The gradient pass's f32 body (gradient.wgsl's write_row_f32): four loads in flight per
// lane; grad_loads4.wgsl is the other choice (Strategy::loads_in_flight).

// Writes classes k0, k0 + lanes, … in groups of four below `end`; returns the first class
// not written.
fn write_body_f32(g: RowGradient, k0: u32, lanes: u32, end: u32) -> u32 {
    var k = k0;
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
    return k;
}
