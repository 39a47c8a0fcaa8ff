//! Reverse-mode symbolic differentiation over the DAG.
//!
//! Each op knows only its local derivative (`local_gradients`), one term per
//! argument; a node used several times gets the sum of its uses' terms; the
//! walk goes over the nodes in reverse topological order. The result is IR,
//! built through the same simplifying builder as the loss itself.
//!
//! Subgradients at kinks, by convention (documented in docs/language.md):
//! relu'(0) = 0, abs'(0) = 0, d(x^y)/dy = 0 at x = 0, min/max send the gradient to the first argument
//! on ties, comparisons and `sign` are piecewise constant (zero gradient),
//! and a sort's permutation is treated as constant: the gradient flows
//! through the sorted values back to their original positions.

use std::collections::HashMap;

use crate::ir::{AxisSet, Graph, NodeId, Op, Space};

/// d root / d input for each of `inputs`; `None` where the root does not depend on it.
pub fn differentiate(g: &mut Graph, root: NodeId, inputs: &[NodeId]) -> Vec<Option<NodeId>> {
    let order = g.reachable(&[root]);
    let mut adjoint: HashMap<NodeId, NodeId> = HashMap::new();
    let one = g.constant(1.0);
    adjoint.insert(root, one);
    for &id in order.iter().rev() {
        let Some(&adj) = adjoint.get(&id) else {
            continue;
        };
        let node = g.node(id);
        let args = node.args.clone();
        // An elementwise node's terms stand for its whole extent, even where they vary
        // over fewer axes than it does (a constant adjoint such as a mean's 1/N; in a
        // sorted block, a group's adjoint for an outer value added to each element).
        let spans = node.op.is_elementwise().then_some(node.axes);
        for (arg, term) in local_gradients(g, id, adj) {
            let term = reduce_to(g, term, args[arg], spans);
            let total = match adjoint.get(&args[arg]) {
                Some(&prev) => g.add(Op::Add, &[prev, term]),
                None => term,
            };
            adjoint.insert(args[arg], total);
        }
    }
    inputs.iter().map(|i| adjoint.get(i).copied()).collect()
}

/// Sums a gradient term over the axes its target does not vary over (the adjoint of
/// broadcasting). `spans`: the axes the term stands for, if more than its own: summed over
/// an axis it is constant along, it counts that axis's extent times (d mean(x + s) / ds = 1,
/// not 1/N).
fn reduce_to(g: &mut Graph, term: NodeId, target: NodeId, spans: Option<AxisSet>) -> NodeId {
    let t = g.node(target);
    let target_axes = t.axes;
    let extra = match (g.space(term), t.space) {
        (Space::Sorted(_), Space::Elements) => AxisSet::ALL.minus(t.axes),
        _ => g.axes(term).minus(t.axes),
    };
    let constant_along = spans.map_or(AxisSet::NONE, |s| s.minus(target_axes).minus(g.axes(term)));
    let summed = if extra.is_empty() { term } else { g.add(Op::Sum(extra), &[term]) };
    if constant_along.is_empty() {
        summed
    } else {
        let count = g.add(Op::Extent(constant_along), &[]);
        g.add(Op::Mul, &[summed, count])
    }
}

/// For node `id` with adjoint `a`: (argument position, a * d id / d arg) for each argument that has one.
fn local_gradients(g: &mut Graph, id: NodeId, a: NodeId) -> Vec<(usize, NodeId)> {
    let n = g.node(id).clone();
    let x = n.args.first().copied();
    let mut b = Builder { g };
    let (x0, x1) = (x.unwrap_or(id), n.args.get(1).copied().unwrap_or(id));
    match n.op {
        Op::Const(_) | Op::Input { .. } | Op::ClassIndex | Op::Extent(_) => vec![],
        // Piecewise constant: zero almost everywhere.
        Op::Sign | Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::Eq | Op::Ne | Op::Sort { .. } => vec![],
        Op::Neg => vec![(0, b.neg(a))],
        Op::Exp => vec![(0, b.mul(a, id))],
        Op::Log => vec![(0, b.div(a, x0))],
        Op::Log1p => {
            let d = b.add_c(x0, 1.0);
            vec![(0, b.div(a, d))]
        }
        Op::Sqrt => {
            let two_r = b.mul_c(2.0, id);
            vec![(0, b.div(a, two_r))]
        }
        Op::Abs => {
            let s = b.op(Op::Sign, &[x0]);
            vec![(0, b.mul(a, s))]
        }
        Op::Sigmoid => {
            // s' = s (1 - s) = s sigmoid(-x): no cancellation when s is near 1.
            let nx = b.neg(x0);
            let sm = b.op(Op::Sigmoid, &[nx]);
            let d = b.mul(id, sm);
            vec![(0, b.mul(a, d))]
        }
        Op::Softplus => {
            let s = b.op(Op::Sigmoid, &[x0]);
            vec![(0, b.mul(a, s))]
        }
        Op::Tanh => {
            let sq = b.mul(id, id);
            let one = b.c(1.0);
            let d = b.op(Op::Sub, &[one, sq]);
            vec![(0, b.mul(a, d))]
        }
        Op::Relu => {
            let zero = b.c(0.0);
            let pos = b.op(Op::Gt, &[x0, zero]);
            vec![(0, b.op(Op::Select, &[pos, a, zero]))]
        }
        Op::Add => vec![(0, a), (1, a)],
        Op::Sub => vec![(0, a), (1, b.neg(a))],
        Op::Mul => vec![(0, b.mul(a, x1)), (1, b.mul(a, x0))],
        Op::Div => {
            // d(x/y)/dy = -(x/y)/y: reuses the quotient.
            let q = b.div(id, x1);
            let t = b.mul(a, q);
            vec![(0, b.div(a, x1)), (1, b.neg(t))]
        }
        Op::Pow => {
            let mut out = Vec::new();
            if !b.g.constant_value(x1).is_some_and(|e| e == 0.0) {
                let one = b.c(1.0);
                let e1 = b.op(Op::Sub, &[x1, one]);
                let p = b.op(Op::Pow, &[x0, e1]);
                let d = b.mul(x1, p);
                out.push((0, b.mul(a, d)));
            }
            if b.g.constant_value(x1).is_none() {
                // d(x^y)/dy = x^y log(x); at x = 0 that is 0 * -inf: take the limit 0, as PyTorch does.
                let l = b.op(Op::Log, &[x0]);
                let d = b.mul(id, l);
                let zero = b.c(0.0);
                let at_zero = b.op(Op::Eq, &[x0, zero]);
                let term = b.mul(a, d);
                out.push((1, b.op(Op::Select, &[at_zero, zero, term])));
            }
            out
        }
        Op::Min | Op::Max => {
            let cmp = if n.op == Op::Min { Op::Le } else { Op::Ge };
            let first = b.op(cmp, &[x0, x1]);
            let zero = b.c(0.0);
            vec![(0, b.op(Op::Select, &[first, a, zero])), (1, b.op(Op::Select, &[first, zero, a]))]
        }
        Op::Select => {
            let zero = b.c(0.0);
            let c = n.args[0];
            vec![(1, b.op(Op::Select, &[c, a, zero])), (2, b.op(Op::Select, &[c, zero, a]))]
        }
        // Summing a broadcast value over an axis it does not vary over counts it extent times.
        Op::Sum(over) => vec![(0, b.times_broadcast(a, x0, over))],
        Op::LogSumExp(over) => {
            // As for a sum: each weight e^(x - lse) is 1/extent along axes x is constant along.
            let d = b.op(Op::Sub, &[x0, id]);
            let w = b.op(Op::Exp, &[d]);
            let term = b.mul(a, w);
            vec![(0, b.times_broadcast(term, x0, over))]
        }
        // A value constant within each group is the same in any order.
        Op::Gather => {
            // A group-constant adjoint is the same in any order; gathering broadcast `v`
            // over the axes it does not vary over used each of its values that many times.
            if b.g.space(a) == Space::Elements {
                let copies = AxisSet::ALL.minus(b.g.axes(x1)).minus(b.g.axes(a));
                let term = if copies.is_empty() { a } else { b.op(Op::Sum(copies), &[a]) };
                vec![(1, term)]
            } else {
                vec![(1, b.op(Op::Scatter, &[x0, a]))]
            }
        }
        Op::Scatter => vec![(1, b.op(Op::Gather, &[x0, a]))],
        Op::Cumsum => vec![(1, b.op(Op::RevCumsum, &[x0, a]))],
        Op::RevCumsum => vec![(1, b.op(Op::Cumsum, &[x0, a]))],
        Op::Prev(_) => vec![(1, b.op(Op::Next, &[x0, a]))],
        Op::Next => vec![(1, b.op(Op::Prev(0f64.to_bits()), &[x0, a]))],
    }
}

struct Builder<'a> {
    g: &'a mut Graph,
}

impl Builder<'_> {
    /// `term` times the extent of the axes of `over` that `arg` does not vary over.
    fn times_broadcast(&mut self, term: NodeId, arg: NodeId, over: AxisSet) -> NodeId {
        let arg = self.g.node(arg);
        let missing = if arg.space == Space::Elements { over.minus(arg.axes) } else { AxisSet::NONE };
        if missing.is_empty() {
            term
        } else {
            let count = self.op(Op::Extent(missing), &[]);
            self.mul(term, count)
        }
    }

    fn op(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.g.add(op, args)
    }
    fn c(&mut self, v: f64) -> NodeId {
        self.g.constant(v)
    }
    fn neg(&mut self, x: NodeId) -> NodeId {
        self.op(Op::Neg, &[x])
    }
    fn mul(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.op(Op::Mul, &[x, y])
    }
    fn div(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.op(Op::Div, &[x, y])
    }
    fn mul_c(&mut self, c: f64, x: NodeId) -> NodeId {
        let c = self.c(c);
        self.mul(c, x)
    }
    fn add_c(&mut self, x: NodeId, c: f64) -> NodeId {
        let c = self.c(c);
        self.op(Op::Add, &[x, c])
    }
}
