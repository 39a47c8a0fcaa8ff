//! The intermediate representation: a hash-consed expression DAG.
//!
//! Equal subexpressions are one node, so common subexpressions merge for free.
//! Every node knows the axes it varies over and its *space*: ordinary element
//! order, or the order of a sort (inside a `sorted` block).

mod axes;
mod ops;
mod print;
mod rules;

use std::collections::HashMap;

pub use axes::{AxisSet, AXES};
pub use ops::Op;
pub use print::{format_number, print_graph, Printed};
pub use rules::{RuleSafety, RULES};

/// A node of one `Graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// Where the elements of a value live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// Ordinary `[batch, class, spatial]` order.
    Elements,
    /// Reordered by the permutation computed by this `Sort` node, within its groups.
    Sorted(NodeId),
    /// The `Sort` node itself: a permutation, not a number.
    Permutation,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub args: Vec<NodeId>,
    pub axes: AxisSet,
    pub space: Space,
}

/// Why a node cannot be built: the checker turns these into diagnostics.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TypeError {
    #[error("a value that varies over {axes} is used inside a `sorted` block whose groups fix {}", group_text(*.group))]
    UnsortedInSorted { axes: AxisSet, group: AxisSet },
    #[error("values from two different `sorted` blocks are combined")]
    TwoSorts,
    #[error("a sum inside a `sorted` block must reduce over the whole group, here {need}")]
    PartialSortedReduction { need: AxisSet },
    #[error("`{op}` is only defined on values in element order (outside `sorted` blocks)")]
    NeedsElements { op: &'static str },
    #[error("`{op}` needs values in the order of its `sorted` block")]
    NeedsSorted { op: &'static str },
}

fn group_text(group: AxisSet) -> String {
    if group.is_empty() {
        "no axis (one group: the whole tensor)".into()
    } else {
        format!("only {group}")
    }
}

/// An arena of unique nodes. With `simplify` on, every node goes through
/// constant folding and the rewrite rules in `rules.rs` as it is built.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    unique: HashMap<(Op, Vec<NodeId>), NodeId>,
    pub simplify: bool,
    /// With `simplify` on, apply only the `Exact` rules (bit-for-bit the same values).
    pub exact_only: bool,
}

impl Graph {
    pub fn new(simplify: bool) -> Graph {
        Graph { simplify, ..Graph::default() }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    pub fn axes(&self, id: NodeId) -> AxisSet {
        self.node(id).axes
    }
    pub fn space(&self, id: NodeId) -> Space {
        self.node(id).space
    }
    pub fn constant_value(&self, id: NodeId) -> Option<f64> {
        match self.node(id).op {
            Op::Const(bits) => Some(f64::from_bits(bits)),
            _ => None,
        }
    }

    /// The value of a node built only from constants and elementwise ops, if it is one.
    pub fn fold(&self, id: NodeId) -> Option<f64> {
        let mut value: HashMap<NodeId, Option<f64>> = HashMap::new();
        for n in self.reachable(&[id]) {
            let node = self.node(n);
            let v = match node.op {
                Op::Const(bits) => Some(f64::from_bits(bits)),
                op => node.args.iter().map(|a| value[a]).collect::<Option<Vec<f64>>>().and_then(|args| op.apply(&args)),
            };
            value.insert(n, v);
        }
        value[&id]
    }

    pub fn constant(&mut self, v: f64) -> NodeId {
        self.intern(Op::Const(v.to_bits()), vec![]).expect("invariant: constants always type-check")
    }

    /// Builds a node that is known to type-check (used by the differentiator).
    pub fn add(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.try_add(op, args).unwrap_or_else(|e| panic!("invariant: {op:?} type-checks: {e}"))
    }

    /// Builds a node, simplifying it when `self.simplify` is on.
    pub fn try_add(&mut self, op: Op, args: &[NodeId]) -> Result<NodeId, TypeError> {
        let mut args = args.to_vec();
        if self.simplify {
            if let Some(id) = rules::rewrite(self, op, &args)? {
                return Ok(id);
            }
            // Commutative operands in a canonical order (IEEE-exact), so `p*y` and `y*p` merge;
            // constants go first in products (`2 * x`) and last in sums (`x + 1`).
            if matches!(op, Op::Add | Op::Mul) {
                let key = |g: &Graph, id: NodeId| (g.constant_value(id).is_some() == (op == Op::Add), id);
                if key(self, args[1]) < key(self, args[0]) {
                    args.swap(0, 1);
                }
            }
        }
        self.intern(op, args)
    }

    fn intern(&mut self, op: Op, args: Vec<NodeId>) -> Result<NodeId, TypeError> {
        if let Some(&id) = self.unique.get(&(op, args.clone())) {
            return Ok(id);
        }
        let (axes, space) = self.infer(op, &args)?;
        let id = NodeId(u32::try_from(self.nodes.len()).expect("invariant: fewer than 2^32 nodes"));
        self.nodes.push(Node { op, args: args.clone(), axes, space });
        self.unique.insert((op, args), id);
        Ok(id)
    }

    /// The typing rules: which axes a node varies over and in which order its elements are.
    fn infer(&self, op: Op, args: &[NodeId]) -> Result<(AxisSet, Space), TypeError> {
        assert_eq!(args.len(), op.arity(), "invariant: {op:?} takes {} arguments", op.arity());
        let perm_group = |sort: NodeId| match self.node(sort).op {
            Op::Sort { group, .. } => group,
            other => panic!("invariant: sorted-order ops take a Sort node first, not {other:?}"),
        };
        Ok(match op {
            Op::Const(_) | Op::Extent(_) => (AxisSet::NONE, Space::Elements),
            Op::Input { axes, .. } => (axes, Space::Elements),
            Op::ClassIndex => (AxisSet::CLASS, Space::Elements),
            Op::Sum(over) | Op::LogSumExp(over) => {
                let a = self.node(args[0]);
                match a.space {
                    Space::Sorted(sort) => {
                        let need = AxisSet::ALL.minus(perm_group(sort));
                        if matches!(op, Op::LogSumExp(_)) {
                            return Err(TypeError::NeedsElements { op: "softmax/logsumexp" });
                        }
                        if !over.contains(need) {
                            return Err(TypeError::PartialSortedReduction { need });
                        }
                        (AxisSet::ALL.minus(over), Space::Elements)
                    }
                    _ => (a.axes.minus(over), Space::Elements),
                }
            }
            Op::Sort { .. } => {
                self.require_elements(args[0], "sort")?;
                (AxisSet::ALL, Space::Permutation)
            }
            Op::Gather => {
                self.require_elements(args[1], "gather")?;
                (AxisSet::ALL, Space::Sorted(args[0]))
            }
            Op::Scatter => {
                if self.space(args[1]) != Space::Sorted(args[0]) {
                    return Err(TypeError::NeedsSorted { op: "scatter" });
                }
                (AxisSet::ALL, Space::Elements)
            }
            Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => {
                let v = self.node(args[1]);
                let group = perm_group(args[0]);
                match v.space {
                    Space::Sorted(s) if s == args[0] => {}
                    Space::Elements if group.contains(v.axes) => {}
                    _ => return Err(TypeError::NeedsSorted { op: op.name() }),
                }
                (AxisSet::ALL, Space::Sorted(args[0]))
            }
            _ => self.infer_elementwise(args)?,
        })
    }

    fn require_elements(&self, id: NodeId, op: &'static str) -> Result<(), TypeError> {
        match self.space(id) {
            Space::Elements => Ok(()),
            _ => Err(TypeError::NeedsElements { op }),
        }
    }

    /// Elementwise: axes are the union; values in sorted order may only meet
    /// values of the same sort, or values constant within its groups.
    fn infer_elementwise(&self, args: &[NodeId]) -> Result<(AxisSet, Space), TypeError> {
        let mut axes = AxisSet::NONE;
        let mut sort = None;
        for &a in args {
            let n = self.node(a);
            axes = axes.union(n.axes);
            match n.space {
                Space::Sorted(s) if sort.is_some_and(|t| t != s) => return Err(TypeError::TwoSorts),
                Space::Sorted(s) => sort = Some(s),
                Space::Permutation => return Err(TypeError::NeedsElements { op: "arithmetic" }),
                Space::Elements => {}
            }
        }
        let Some(sort) = sort else {
            return Ok((axes, Space::Elements));
        };
        let Op::Sort { group, .. } = self.node(sort).op else { unreachable!("Sorted space names a Sort node") };
        for &a in args {
            let n = self.node(a);
            if n.space == Space::Elements && !group.contains(n.axes) {
                return Err(TypeError::UnsortedInSorted { axes: n.axes, group });
            }
        }
        Ok((AxisSet::ALL, Space::Sorted(sort)))
    }

    /// Every node reachable from `roots`, in topological (id) order.
    pub fn reachable(&self, roots: &[NodeId]) -> Vec<NodeId> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut seen[id.0 as usize], true) {
                continue;
            }
            stack.extend(self.node(id).args.iter().copied());
        }
        (0..self.nodes.len() as u32).map(NodeId).filter(|id| seen[id.0 as usize]).collect()
    }

    /// Copies what `roots` need into a fresh graph (simplifying if asked);
    /// returns it with the new ids of the roots. Unreachable nodes are dropped.
    pub fn rebuild(&self, roots: &[NodeId], simplify: bool) -> (Graph, Vec<NodeId>) {
        self.rebuild_into(Graph::new(simplify), roots)
    }

    /// `rebuild` with only the rules that keep every bit of every value.
    pub fn rebuild_exact(&self, roots: &[NodeId]) -> (Graph, Vec<NodeId>) {
        self.rebuild_into(Graph { exact_only: true, ..Graph::new(true) }, roots)
    }

    fn rebuild_into(&self, mut out: Graph, roots: &[NodeId]) -> (Graph, Vec<NodeId>) {
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        for id in self.reachable(roots) {
            let n = self.node(id);
            let args: Vec<NodeId> = n.args.iter().map(|a| map[a]).collect();
            let new = out.try_add(n.op, &args).expect("invariant: a well-typed graph rebuilds");
            map.insert(id, new);
        }
        let roots = roots.iter().map(|r| map[r]).collect();
        (out, roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_subexpressions_are_one_node() {
        let mut g = Graph::new(true);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let y = g.add(Op::Input { index: 1, axes: AxisSet::ALL }, &[]);
        let a = g.add(Op::Mul, &[x, y]);
        let b = g.add(Op::Mul, &[y, x]);
        assert_eq!(a, b);
        let e1 = g.add(Op::Exp, &[a]);
        let e2 = g.add(Op::Exp, &[b]);
        assert_eq!(e1, e2);
    }

    #[test]
    fn reductions_drop_axes() {
        let mut g = Graph::new(false);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let s = g.add(Op::Sum(AxisSet::BATCH.union(AxisSet::SPATIAL)), &[x]);
        assert_eq!(g.axes(s), AxisSet::CLASS);
    }

    #[test]
    fn sorted_values_do_not_mix_with_unsorted_ones() {
        let mut g = Graph::new(false);
        let x = g.add(Op::Input { index: 0, axes: AxisSet::ALL }, &[]);
        let sort = g.add(Op::Sort { group: AxisSet::BATCH, descending: true }, &[x]);
        let xs = g.add(Op::Gather, &[sort, x]);
        assert!(matches!(g.try_add(Op::Mul, &[xs, x]), Err(TypeError::UnsortedInSorted { .. })));
        let total = g.add(Op::Sum(AxisSet::CLASS.union(AxisSet::SPATIAL)), &[xs]);
        assert_eq!((g.axes(total), g.space(total)), (AxisSet::BATCH, Space::Elements));
        assert!(g.try_add(Op::Mul, &[xs, total]).is_ok());
    }
}
