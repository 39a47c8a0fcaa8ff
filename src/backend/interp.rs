//! The reference evaluator: every node as a dense f64 tensor, one node at a time.
//!
//! It is meant to be obviously correct, not fast: each op is a plain loop over
//! elements, sums are compensated (Neumaier), and a value is dropped after its
//! last use so that large inputs fit in memory.

use std::collections::HashMap;

use crate::ir::{Graph, NodeId, Op};
use crate::tensor::Tensor;

/// A sort's result: for each position in sorted layout, the element it holds,
/// and each group's positions in row-major order.
struct Permutation {
    source: Vec<usize>,
    groups: Vec<Vec<usize>>,
}

enum Value {
    Tensor(Tensor),
    Permutation(Permutation),
}

impl Value {
    fn tensor(&self) -> &Tensor {
        match self {
            Value::Tensor(t) => t,
            Value::Permutation(_) => {
                panic!("invariant: a permutation is only an argument of sorted-order ops")
            }
        }
    }
    fn permutation(&self) -> &Permutation {
        match self {
            Value::Permutation(p) => p,
            Value::Tensor(_) => panic!("invariant: sorted-order ops take a Sort node first"),
        }
    }
}

/// Evaluates `roots` on `inputs`. `extents` is the broadcast `[batch, class, spatial]`.
/// The caller has checked that every input's shape fits the extents.
pub fn evaluate(g: &Graph, roots: &[NodeId], inputs: &[&Tensor], extents: [usize; 3]) -> Vec<Tensor> {
    evaluate_with(g, roots, inputs, extents, &HashMap::new())
}

/// `evaluate`, taking the values of the nodes in `known` as given (their arguments
/// are not evaluated). The blocked runtime uses it to evaluate one block of a sweep
/// with the results of earlier sweeps.
pub fn evaluate_with(
    g: &Graph,
    roots: &[NodeId],
    inputs: &[&Tensor],
    extents: [usize; 3],
    known: &HashMap<NodeId, Tensor>,
) -> Vec<Tensor> {
    // Tables indexed by node id: the tails of the native engines come here on every
    // call, with a few small nodes, where hashing would cost more than the arithmetic.
    let order = reachable_stopping_at(g, roots, known);
    let mut last_use = vec![0usize; g.len()];
    for (step, &id) in order.iter().enumerate() {
        for &a in &g.node(id).args {
            last_use[a.0 as usize] = step;
        }
    }
    for &r in roots {
        last_use[r.0 as usize] = usize::MAX;
    }
    let mut values: Vec<Option<Value>> = (0..g.len()).map(|_| None).collect();
    for (step, &id) in order.iter().enumerate() {
        if let Some(t) = known.get(&id) {
            values[id.0 as usize] = Some(Value::Tensor(t.clone()));
            continue;
        }
        let n = g.node(id);
        let args: Vec<&Value> =
            n.args.iter().map(|a| values[a.0 as usize].as_ref().expect("invariant: arguments come first")).collect();
        let v = eval_node(n.op, &args, inputs, extents);
        values[id.0 as usize] = Some(v);
        for a in &n.args {
            if last_use[a.0 as usize] == step {
                values[a.0 as usize] = None;
            }
        }
    }
    roots
        .iter()
        .map(|r| values[r.0 as usize].as_ref().expect("invariant: a root is evaluated").tensor().clone())
        .collect()
}

/// The nodes `roots` need, in topological order (ids ascend along edges), not looking
/// below known nodes.
fn reachable_stopping_at(g: &Graph, roots: &[NodeId], known: &HashMap<NodeId, Tensor>) -> Vec<NodeId> {
    let mut seen = vec![false; g.len()];
    let mut stack = roots.to_vec();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut seen[id.0 as usize], true) && !known.contains_key(&id) {
            stack.extend(g.node(id).args.iter().copied());
        }
    }
    (0..g.len() as u32).map(NodeId).filter(|id| seen[id.0 as usize]).collect()
}

fn eval_node(op: Op, args: &[&Value], inputs: &[&Tensor], ext: [usize; 3]) -> Value {
    let t = |i: usize| args[i].tensor();
    let tensor = match op {
        Op::Const(bits) => Tensor::scalar(f64::from_bits(bits)),
        Op::Input { index, .. } => inputs[index as usize].clone(),
        Op::ClassIndex => Tensor::new([1, ext[1], 1], (0..ext[1]).map(|c| c as f64).collect()),
        Op::Extent(axes) => Tensor::scalar((0..3).filter(|&i| axes.has_index(i)).map(|i| ext[i] as f64).product()),
        Op::Sum(over) => reduce(t(0), over, ext, sum_compensated),
        Op::LogSumExp(over) => reduce(t(0), over, ext, log_sum_exp),
        Op::Sort { group, descending } => return Value::Permutation(sort(t(0), group, descending, ext)),
        Op::Gather => {
            let (p, v) = (args[0].permutation(), t(1).broadcast_to(ext));
            Tensor::new(ext, p.source.iter().map(|&i| v.data[i]).collect())
        }
        Op::Scatter => {
            let (p, v) = (args[0].permutation(), t(1).broadcast_to(ext));
            let mut out = vec![0.0; v.len()];
            for (pos, &i) in p.source.iter().enumerate() {
                out[i] = v.data[pos];
            }
            Tensor::new(ext, out)
        }
        Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => {
            let (p, v) = (args[0].permutation(), t(1).broadcast_to(ext));
            let mut out = vec![0.0; v.len()];
            for members in &p.groups {
                scan(op, members, &v.data, &mut out);
            }
            Tensor::new(ext, out)
        }
        Op::Neg
        | Op::Exp
        | Op::Log
        | Op::Log1p
        | Op::Sqrt
        | Op::Abs
        | Op::Sign
        | Op::Sigmoid
        | Op::Softplus
        | Op::Tanh
        | Op::Relu
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::Pow
        | Op::Min
        | Op::Max
        | Op::Lt
        | Op::Le
        | Op::Gt
        | Op::Ge
        | Op::Eq
        | Op::Ne
        | Op::Select => elementwise(op, &args.iter().map(|a| a.tensor()).collect::<Vec<_>>()),
    };
    Value::Tensor(tensor)
}

/// Applies a scalar op with broadcasting; the result has the largest extent on each axis.
fn elementwise(op: Op, args: &[&Tensor]) -> Tensor {
    let shape: [usize; 3] = std::array::from_fn(|i| args.iter().map(|a| a.shape[i]).max().unwrap_or(1));
    let strides: Vec<[usize; 3]> = args.iter().map(|a| a.broadcast_strides()).collect();
    let mut data = Vec::with_capacity(shape.iter().product());
    let mut scalars = [0.0; 3];
    for b in 0..shape[0] {
        for c in 0..shape[1] {
            for s in 0..shape[2] {
                for (k, (a, st)) in args.iter().zip(&strides).enumerate() {
                    scalars[k] = a.data[b * st[0] + c * st[1] + s * st[2]];
                }
                data.push(op.apply(&scalars[..args.len()]).expect("invariant: elementwise op"));
            }
        }
    }
    Tensor { shape, data }
}

/// Reduces over `over` with `f(values, copies)`: `copies` is how many times each
/// value counts because the tensor is broadcast along a reduced axis.
fn reduce(x: &Tensor, over: crate::ir::AxisSet, ext: [usize; 3], f: fn(&[f64], f64) -> f64) -> Tensor {
    let out_shape: [usize; 3] = std::array::from_fn(|i| if over.has_index(i) { 1 } else { x.shape[i] });
    let copies: f64 = (0..3).filter(|&i| over.has_index(i) && x.shape[i] == 1).map(|i| ext[i] as f64).product();
    let mut cells: Vec<Vec<f64>> = vec![Vec::new(); out_shape.iter().product()];
    let [_, cn, sn] = x.shape;
    for (i, &v) in x.data.iter().enumerate() {
        let idx = [i / (cn * sn), (i / sn) % cn, i % sn];
        let o: [usize; 3] = std::array::from_fn(|k| if over.has_index(k) { 0 } else { idx[k] });
        cells[(o[0] * out_shape[1] + o[1]) * out_shape[2] + o[2]].push(v);
    }
    Tensor { shape: out_shape, data: cells.iter().map(|c| f(c, copies)).collect() }
}

/// Neumaier's compensated sum, times `copies`.
fn sum_compensated(xs: &[f64], copies: f64) -> f64 {
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for &x in xs {
        let t = sum + x;
        comp += if sum.abs() >= x.abs() { (sum - t) + x } else { (x - t) + sum };
        sum = t;
    }
    // An infinite or NaN sum makes the compensation NaN; the plain sum is then the answer.
    let total = if (sum + comp).is_finite() { sum + comp } else { sum };
    total * copies
}

/// log(copies * sum(exp(x))), shifted by the maximum so that nothing overflows.
fn log_sum_exp(xs: &[f64], copies: f64) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    if m.is_infinite() {
        return m;
    }
    let shifted: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
    m + (sum_compensated(&shifted, copies)).ln()
}

/// Sorts the key within each group (the `group` axes fixed); ties keep element order.
fn sort(key: &Tensor, group: crate::ir::AxisSet, descending: bool, ext: [usize; 3]) -> Permutation {
    let key = key.broadcast_to(ext);
    let gshape: [usize; 3] = std::array::from_fn(|i| if group.has_index(i) { ext[i] } else { 1 });
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); gshape.iter().product()];
    for i in 0..key.len() {
        let idx = [i / (ext[1] * ext[2]), (i / ext[2]) % ext[1], i % ext[2]];
        let gi: [usize; 3] = std::array::from_fn(|k| if group.has_index(k) { idx[k] } else { 0 });
        groups[(gi[0] * gshape[1] + gi[1]) * gshape[2] + gi[2]].push(i);
    }
    let mut source = vec![0; key.len()];
    for members in &groups {
        let mut sorted = members.clone();
        sorted.sort_by(|&a, &b| {
            let o = key.data[a].total_cmp(&key.data[b]);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        for (&pos, &src) in members.iter().zip(&sorted) {
            source[pos] = src;
        }
    }
    Permutation { source, groups }
}

/// One scan along a group's positions (which are in sorted order).
fn scan(op: Op, members: &[usize], v: &[f64], out: &mut [f64]) {
    match op {
        Op::Cumsum => {
            let mut acc = 0.0;
            for &m in members {
                acc += v[m];
                out[m] = acc;
            }
        }
        Op::RevCumsum => {
            let mut acc = 0.0;
            for &m in members.iter().rev() {
                acc += v[m];
                out[m] = acc;
            }
        }
        Op::Prev(init) => {
            let mut prev = f64::from_bits(init);
            for &m in members {
                out[m] = prev;
                prev = v[m];
            }
        }
        Op::Next => {
            let mut next = 0.0;
            for &m in members.iter().rev() {
                out[m] = next;
                next = v[m];
            }
        }
        other => unreachable!("not a scan: {other:?}"),
    }
}
