//! Runs a loss sweep by sweep, as the plan says, over blocks of elements in
//! parallel, with deterministic reductions.
//!
//! Each sweep is split into fixed blocks (one batch item, up to `BLOCK`
//! spatial positions); rayon evaluates the blocks in any order and on any
//! number of threads, but their partial sums are combined in a fixed tree
//! over the block order, so the result is bitwise the same for any thread
//! count. The block evaluator is the f64 reference interpreter given the
//! results of earlier sweeps; the JIT will replace it with native code per
//! sweep, keeping this structure. That also checks the plan: a sweep that
//! needed a reduction of its own sweep would compute it per block, and the
//! result would differ from the reference.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::backend::interp;
use crate::error::Error;
use crate::ir::{AxisSet, Graph, NodeId, Op};
use crate::loss::Loss;
use crate::schedule::schedule;
use crate::schedule::{crosses_elements, levels, streamed};
use crate::tensor::Tensor;

/// Spatial positions per block. A property of the runtime, not of the plan.
pub const BLOCK: usize = 1024;

/// One block: a batch item and a range of spatial positions.
#[derive(Clone, Copy, Debug)]
struct Block {
    b: usize,
    s0: usize,
    len: usize,
}

fn blocks(ext: [usize; 3]) -> Vec<Block> {
    let mut out = Vec::new();
    for b in 0..ext[0] {
        for s0 in (0..ext[2]).step_by(BLOCK) {
            out.push(Block { b, s0, len: BLOCK.min(ext[2] - s0) });
        }
    }
    out
}

/// The part of `t` that block `k` reads (broadcast axes are kept at extent 1).
fn slice(t: &Tensor, k: Block) -> Tensor {
    let [bn, cn, sn] = t.shape;
    let b = if bn == 1 { 0 } else { k.b };
    let (s0, len) = if sn == 1 { (0, 1) } else { (k.s0, k.len) };
    let mut data = Vec::with_capacity(cn * len);
    for c in 0..cn {
        let row = (b * cn + c) * sn;
        data.extend_from_slice(&t.data[row + s0..row + s0 + len]);
    }
    Tensor::new([1, cn, len], data)
}

/// The loss value and (if asked) the gradients, by sweeps over blocks.
pub fn evaluate(loss: &Loss, inputs: &[&Tensor], with_grads: bool) -> Result<(f64, Vec<Tensor>), Error> {
    let ext = loss.checked_extents(inputs)?;
    let g = loss.graph();
    let plan = schedule(loss);
    let mut roots = vec![loss.root()];
    roots.extend(loss.gradient_nodes().iter().flatten());
    let order = g.reachable(&roots);
    for &id in &order {
        if matches!(g.node(id).op, Op::Sort { .. }) {
            return Err(Error::Unsupported("sorting is not supported by the blocked runtime yet".into()));
        }
        if crosses_elements(g, id) && g.axes(id).contains(AxisSet::SPATIAL) {
            return Err(Error::Unsupported("a reduction across the batch that keeps spatial positions".into()));
        }
    }
    let level = levels(g, &roots);
    // The tail: small values (no spatial axis) whose inputs are ready after `done` sweeps,
    // computed once over the whole batch (a block sees only its own batch item).
    let tail = |known: &mut HashMap<NodeId, Tensor>, done: usize| {
        let ready: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|&id| !streamed(g, id) && level[&id] <= done && !known.contains_key(&id))
            .collect();
        let values = interp::evaluate_with(g, &ready, inputs, ext, known);
        known.extend(ready.into_iter().zip(values));
    };
    let mut known: HashMap<NodeId, Tensor> = HashMap::new();
    tail(&mut known, 0);
    let all_blocks = blocks(ext);
    let block_inputs = |k: Block| -> Vec<Tensor> { inputs.iter().map(|t| slice(t, k)).collect() };
    let mut grads: Vec<Tensor> = inputs.iter().map(|t| Tensor::filled(t.shape, 0.0)).collect();
    for (done, sweep) in plan.sweeps.iter().enumerate() {
        // Gradients that vary per position are written block by block; the others
        // (of class weights, say) come from the tail, below.
        let writes: Vec<(usize, NodeId)> = if with_grads {
            sweep
                .writes
                .iter()
                .map(|&i| (i, loss.gradient_nodes()[i].expect("invariant: planned gradient")))
                .filter(|&(_, n)| streamed(g, n))
                .collect()
        } else {
            vec![]
        };
        let mut block_roots = sweep.reductions.clone();
        block_roots.extend(writes.iter().map(|(_, n)| *n));
        if block_roots.is_empty() {
            tail(&mut known, done + 1);
            continue;
        }
        // Every block, in parallel; results kept in block order.
        let results: Vec<Vec<Tensor>> = all_blocks
            .par_iter()
            .map(|&k| {
                let local: Vec<Tensor> = block_inputs(k);
                let refs: Vec<&Tensor> = local.iter().collect();
                let known_here: HashMap<NodeId, Tensor> = known.iter().map(|(id, t)| (*id, slice(t, k))).collect();
                interp::evaluate_with(g, &block_roots, &refs, [1, ext[1], k.len], &known_here)
            })
            .collect();
        for (j, &r) in sweep.reductions.iter().enumerate() {
            let combined = combine(g, r, &all_blocks, results.iter().map(|v| &v[j]).collect(), ext);
            known.insert(r, combined);
        }
        tail(&mut known, done + 1);
        for (w, (i, _)) in writes.iter().enumerate() {
            let spec = &loss.inputs()[*i];
            for (k, res) in all_blocks.iter().zip(&results) {
                let used: [usize; 3] =
                    std::array::from_fn(|a| if spec.axes.has_index(a) { [1, ext[1], k.len][a] } else { 1 });
                add_block(&mut grads[*i], &res[sweep.reductions.len() + w].broadcast_to(used), *k);
            }
        }
    }
    if with_grads {
        for ((grad, spec), node) in grads.iter_mut().zip(loss.inputs()).zip(loss.gradient_nodes()) {
            if let Some(n) = node.filter(|&n| !streamed(g, n)) {
                let used: [usize; 3] = std::array::from_fn(|a| if spec.axes.has_index(a) { ext[a] } else { 1 });
                *grad = known[&n].broadcast_to(used).fit_to(grad.shape);
            }
        }
    }
    let value = known[&loss.root()].data[0];
    Ok((value, grads))
}

/// Combines the per-block partial results of reduction `r` in a fixed tree over block order.
fn combine(g: &Graph, r: NodeId, all: &[Block], partials: Vec<&Tensor>, ext: [usize; 3]) -> Tensor {
    let keeps_batch = g.axes(r).contains(AxisSet::BATCH);
    let cn = partials.first().map_or(1, |t| t.shape[1]);
    let rows = if keeps_batch { ext[0] } else { 1 };
    let lse = matches!(g.node(r).op, Op::LogSumExp(_));
    let mut out = Tensor::filled([rows, cn, 1], 0.0);
    for row in 0..rows {
        let mine: Vec<&Tensor> =
            all.iter().zip(&partials).filter(|(k, _)| !keeps_batch || k.b == row).map(|(_, t)| *t).collect();
        for c in 0..cn {
            let values: Vec<f64> = mine.iter().map(|t| t.data[c]).collect();
            out.data[row * cn + c] = tree(&values, lse);
        }
    }
    out
}

/// Pairwise combination in a fixed shape: the same bits however the blocks were scheduled.
pub(crate) fn tree(values: &[f64], lse: bool) -> f64 {
    match values.len() {
        0 => {
            if lse {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        }
        1 => values[0],
        n => {
            let (a, b) = (tree(&values[..n / 2], lse), tree(&values[n / 2..], lse));
            if lse {
                let m = a.max(b);
                if m == f64::NEG_INFINITY {
                    m
                } else {
                    m + ((a - m).exp() + (b - m).exp()).ln()
                }
            } else {
                a + b
            }
        }
    }
}

/// Adds a block's gradient (shaped `[1, C or 1, len or 1]`) into the input's gradient,
/// summing over the axes along which the input is broadcast.
fn add_block(grad: &mut Tensor, block: &Tensor, k: Block) {
    let [bn, cn, sn] = grad.shape;
    let b = if bn == 1 { 0 } else { k.b };
    let [_, bc, bs] = block.shape;
    for c in 0..bc {
        for s in 0..bs {
            let v = block.data[c * bs + s];
            let (gc, gs) = (if cn == 1 { 0 } else { c }, if sn == 1 { 0 } else { k.s0 + s });
            grad.data[(b * cn + gc) * sn + gs] += v;
        }
    }
}
