//! Cuts a loss and its gradient into sweeps: full passes over the elements.
//!
//! A value that varies over elements (batch and spatial positions) is computed
//! inside a sweep; a reduction across elements (a sum over batch or spatial, a
//! sort) can only be used after the sweep that accumulates it has finished.
//! So each node gets a *level*: the number of finished sweeps it needs.
//! Reductions over the class axis alone run as an inner loop at each element
//! (softmax, per-pixel cross-entropy) and cost no sweep. The loss value is
//! ready after `level(loss)` sweeps; each gradient is written in sweep
//! `level(gradient) + 1`. Dice needs two sweeps (sums, then the gradient);
//! a mean of elementwise terms needs one (its scale 1/N is known up front).
//!
//! The plan says what is computed when, never how: no thread counts or
//! block sizes, which the runtime chooses.

use std::collections::{BTreeSet, HashMap};

use crate::ir::{print_graph, AxisSet, Graph, NodeId, Op};
use crate::loss::Loss;

/// What one sweep does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sweep {
    /// Inputs it streams, by index.
    pub reads: BTreeSet<usize>,
    /// Cross-element reductions it accumulates.
    pub reductions: Vec<NodeId>,
    /// Sorts whose keys it produces (the sort runs after the sweep).
    pub sorts: Vec<NodeId>,
    /// Inputs whose gradient it writes.
    pub writes: Vec<usize>,
}

/// The sweeps of a loss and its gradient, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub sweeps: Vec<Sweep>,
    /// After how many sweeps the loss value is known.
    pub loss_ready_after: usize,
}

/// Whether a value is streamed (one per spatial position, or in sorted order),
/// rather than a small table over batch and class that the tail computes.
pub fn streamed(g: &Graph, id: NodeId) -> bool {
    g.axes(id).contains(AxisSet::SPATIAL) || g.space(id) != crate::ir::Space::Elements
}

/// Whether `op` needs a whole pass over the elements before its result can be used:
/// a reduction of a streamed value across positions, a sort, a reverse scan.
/// (A sum over the batch of per-image values is tail work, not a pass.)
pub fn crosses_elements(g: &Graph, id: NodeId) -> bool {
    let elements = AxisSet::BATCH.union(AxisSet::SPATIAL);
    let n = g.node(id);
    match n.op {
        Op::Sum(over) | Op::LogSumExp(over) => !over.intersect(elements).is_empty() && streamed(g, n.args[0]),
        // A sort needs its whole key; a reverse scan needs its group's total.
        Op::Sort { .. } | Op::RevCumsum | Op::Next => true,
        _ => false,
    }
}

/// The number of finished sweeps each node needs.
pub fn levels(g: &Graph, roots: &[NodeId]) -> HashMap<NodeId, usize> {
    let mut level = HashMap::new();
    for id in g.reachable(roots) {
        let below = g.node(id).args.iter().map(|a| level[a]).max().unwrap_or(0);
        level.insert(id, if crosses_elements(g, id) { below + 1 } else { below });
    }
    level
}

/// Schedules `loss` with the gradient of every input it depends on.
pub fn schedule(loss: &Loss) -> Plan {
    let g = loss.graph();
    let grads: Vec<(usize, NodeId)> =
        loss.gradient_nodes().iter().enumerate().filter_map(|(i, n)| n.map(|n| (i, n))).collect();
    let mut roots = vec![loss.root()];
    roots.extend(grads.iter().map(|(_, n)| *n));
    let level = levels(g, &roots);
    let loss_ready_after = level[&loss.root()];
    let count = grads.iter().map(|(_, n)| level[n] + 1).chain([loss_ready_after]).max().unwrap_or(0).max(1);
    let mut sweeps = vec![Sweep::default(); count];
    for id in g.reachable(&roots) {
        if crosses_elements(g, id) {
            let sweep = &mut sweeps[level[&id] - 1];
            if matches!(g.node(id).op, Op::Sort { .. }) {
                sweep.sorts.push(id);
            } else {
                sweep.reductions.push(id);
            }
            let operands = g.node(id).args.clone();
            sweep.reads.extend(inputs_read(g, &operands, &level, level[&id] - 1));
        }
    }
    for (i, n) in &grads {
        let sweep = &mut sweeps[level[n]];
        sweep.writes.push(*i);
        sweep.reads.extend(inputs_read(g, &[*n], &level, level[n]));
    }
    Plan { sweeps, loss_ready_after }
}

/// Inputs streamed to evaluate `roots` in the sweep after `done` finished sweeps:
/// results of earlier sweeps are read as scalars, not streamed.
pub fn inputs_read(g: &Graph, roots: &[NodeId], level: &HashMap<NodeId, usize>, done: usize) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    let mut stack = roots.to_vec();
    let mut seen = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) || (crosses_elements(g, id) && level[&id] <= done) {
            continue;
        }
        if let Op::Input { index, .. } = g.node(id).op {
            out.insert(index as usize);
        }
        stack.extend(g.node(id).args.iter().copied());
    }
    out
}

impl Plan {
    /// The plan as text, like Halide's `print_loop_nest`.
    pub fn print(&self, loss: &Loss) -> String {
        let g = loss.graph();
        let names: Vec<String> = loss.inputs().iter().map(|i| i.name.clone()).collect();
        let list = |idx: &BTreeSet<usize>| idx.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>().join(", ");
        let mut out = format!("plan {}: {} sweep{}\n", loss.name(), self.sweeps.len(), plural(self.sweeps.len()));
        if self.loss_ready_after == 0 {
            out += "  the loss value needs no pass over the elements\n";
        }
        for (k, s) in self.sweeps.iter().enumerate() {
            out += &format!(
                "  sweep {}: read {}\n",
                k + 1,
                if s.reads.is_empty() { "nothing".into() } else { list(&s.reads) }
            );
            let labelled: Vec<(String, NodeId)> = s
                .reductions
                .iter()
                .enumerate()
                .map(|(j, &n)| (format!("r{}", j), n))
                .chain(s.sorts.iter().enumerate().map(|(j, &n)| (format!("sort{j}"), n)))
                .collect();
            if !labelled.is_empty() {
                let roots: Vec<(&str, NodeId)> = labelled.iter().map(|(l, n)| (l.as_str(), *n)).collect();
                for line in print_graph(g, &roots, &names).body.lines() {
                    out += &format!("  {line}\n");
                }
            }
            if !s.writes.is_empty() {
                let w: Vec<String> = s.writes.iter().map(|&i| format!("d/d{}", names[i])).collect();
                out += &format!("    write {}\n", w.join(", "));
            }
            if self.loss_ready_after == k + 1 {
                out += "    then: the loss value\n";
            }
        }
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweeps(name: &str) -> usize {
        schedule(&Loss::compile(name, "").expect("compiles")).sweeps.len()
    }

    #[test]
    fn overlap_losses_take_two_sweeps() {
        for name in
            ["dice", "iou", "tversky", "focal_tversky", "combo", "dice_bce", "dice_multiclass", "generalized_dice"]
        {
            assert_eq!(sweeps(name), 2, "{name}");
        }
    }

    #[test]
    fn elementwise_means_take_one_sweep() {
        for name in ["bce", "bce_logits", "focal", "cross_entropy", "boundary"] {
            assert_eq!(sweeps(name), 1, "{name}");
        }
    }
}
