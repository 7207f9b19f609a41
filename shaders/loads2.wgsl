// A lane's 16-byte loads over a row's aligned body, two in flight before either is folded
// (rows.wgsl's fold_row; loads4.wgsl is the other choice, Strategy::loads_in_flight).

// Folds the loads v0, v0 + lanes, … below v_end but a last odd one, whose index it returns.
fn fold_body(st: ptr<function, RowStats>, wild: ptr<function, bool>, v0: u32, v_end: u32, lanes: u32, first: u32) -> u32 {
    var v = v0;
    for (; v + lanes < v_end; v += 2u * lanes) {
        let q0 = logits[v];
        let q1 = logits[v + lanes];
        *wild = fold_vector(st, q0, v, first) || *wild;
        *wild = fold_vector(st, q1, v + lanes, first) || *wild;
    }
    return v;
}
