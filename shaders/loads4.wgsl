// A lane's 16-byte loads over a row's aligned body, four in flight before any is folded, in
// the same order as loads2.wgsl (so the same bits): more bytes in flight per lane, for a
// device whose memory wants them; a module of its own, so that no other compiles it.

// Folds the loads v0, v0 + lanes, … below v_end but a last odd one, whose index it returns.
fn fold_body(st: ptr<function, RowStats>, wild: ptr<function, bool>, v0: u32, v_end: u32, lanes: u32, first: u32) -> u32 {
    var v = v0;
    for (; v + 3u * lanes < v_end; v += 4u * lanes) {
        let q0 = logits[v];
        let q1 = logits[v + lanes];
        let q2 = logits[v + 2u * lanes];
        let q3 = logits[v + 3u * lanes];
        *wild = fold_vector(st, q0, v, first) || *wild;
        *wild = fold_vector(st, q1, v + lanes, first) || *wild;
        *wild = fold_vector(st, q2, v + 2u * lanes, first) || *wild;
        *wild = fold_vector(st, q3, v + 3u * lanes, first) || *wild;
    }
    if v + lanes < v_end {
        let q0 = logits[v];
        let q1 = logits[v + lanes];
        *wild = fold_vector(st, q0, v, first) || *wild;
        *wild = fold_vector(st, q1, v + lanes, first) || *wild;
        v += 2u * lanes;
    }
    return v;
}
