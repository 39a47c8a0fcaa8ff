//! The plan's sweeps as native kernels over blocks, in parallel.
//!
//! For each combination of class count, broadcast pattern and requested gradients a
//! loss is first evaluated with, its sweeps are compiled once (`backend::cranelift::sweep`)
//! and cached in the `Loss`. A call then:
//! 1. evaluates the small tail values that need no pass (constants, class weights) in f64;
//! 2. per sweep, runs the kernel on every block (one batch item, up to `BLOCK` positions)
//!    with rayon; each block leaves its partial sums (f64) in its own slots and writes its
//!    positions of the gradients;
//! 3. combines the partials in a fixed tree over block order (bitwise the same for any
//!    thread count) and evaluates the tail values that became computable.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::backend::cranelift::sweep::{self, Args, Kernels, Shape, SweepSpec, Write};
use crate::backend::interp;
use crate::error::Error;
use crate::ir::{AxisSet, Graph, NodeId, Op};
use crate::loss::Loss;
use crate::runtime::blocked::tree;
use crate::schedule::{crosses_elements, levels, streamed};
use crate::tensor::{Tensor, View};

/// Spatial positions per block. Within a block each lane sums at most BLOCK / 4 values in
/// f32; blocks are combined in f64.
pub const BLOCK: usize = 2048;

/// The most classes the kernels unroll; more run on the blocked interpreter.
pub const MAX_CLASSES: usize = 64;

/// The most values (nodes, times the classes of those along the class axis) a loss and
/// its gradients may compute per position for the kernels; more run on the blocked
/// interpreter. The stdlib's largest use a few thousand at 64 classes.
pub const MAX_KERNEL_VALUES: usize = 16_384;

/// Why a loss or a call cannot run natively (the caller falls back), or `None`.
pub fn unsupported(loss: &Loss, inputs: &[View], ext: [usize; 3], want: &[bool]) -> Option<String> {
    if ext[1] > MAX_CLASSES {
        return Some(format!("more than {MAX_CLASSES} classes"));
    }
    let g = loss.graph();
    // Kernels of tens of thousands of values (thousands of sums, long chains of lets) take
    // long to compile and spill more than a thread's stack holds: the per-block
    // interpreter runs those.
    let mut size = 0;
    for id in g.reachable(&roots(loss, want)) {
        if streamed(g, id) {
            size += if g.axes(id).contains(AxisSet::CLASS) { ext[1] } else { 1 };
        }
        let n = g.node(id);
        let ok = match n.op {
            Op::Sort { .. } | Op::Gather | Op::Scatter | Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => false,
            Op::LogSumExp(_) if crosses_elements(g, id) => false,
            Op::Sum(_) | Op::LogSumExp(_) if streamed(g, id) => {
                n.op == Op::Sum(AxisSet::CLASS) || n.op == Op::LogSumExp(AxisSet::CLASS)
            }
            _ => true,
        };
        if !ok {
            return Some(format!("`{}` over elements", n.op.name()));
        }
    }
    if size > MAX_KERNEL_VALUES {
        return Some(format!("{size} values per position, more than the kernels take ({MAX_KERNEL_VALUES})"));
    }
    // A gradient is written per position, or summed over positions where the input is
    // broadcast along the spatial axis; blocks of different batch items cannot share positions.
    for ((spec, v), &w) in loss.inputs().iter().zip(inputs).zip(want) {
        if w && spec.axes.has_index(0) && v.shape[0] != ext[0] && v.shape[2] == ext[2] && ext[2] > 1 {
            return Some(format!("the gradient of `{}`, broadcast over the batch but not over positions", spec.name));
        }
    }
    None
}

fn roots(loss: &Loss, want: &[bool]) -> Vec<NodeId> {
    let mut roots = vec![loss.root()];
    roots.extend(loss.gradient_nodes().iter().zip(want).filter(|(_, &w)| w).filter_map(|(g, _)| *g));
    roots
}

/// What a loss is compiled for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub shape: Shape,
    /// Per input: given with one class row.
    pub one_row: Vec<bool>,
    pub want: Vec<bool>,
}

/// One sweep: its kernel and what its sums are.
pub(crate) struct Sweep {
    pub spec: SweepSpec,
    /// The reduction nodes computed by the first sums.
    pub reductions: Vec<NodeId>,
    /// The inputs (broadcast along positions) whose gradients the remaining sums are.
    pub grad_sums: Vec<usize>,
}

/// The sweeps of a loss for one key, as kernel specs: what every backend renders.
pub(crate) struct SweepPlan {
    /// Per sweep: what it computes, or `None` when it only runs the tail.
    pub sweeps: Vec<Option<Sweep>>,
    pub level: HashMap<NodeId, usize>,
    /// Every node the loss and the wanted gradients need, in topological order.
    pub order: Vec<NodeId>,
}

/// How a backend wants its sweeps planned.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanOptions {
    /// Carry the costliest value a gradient sweep would compute again from the sweep
    /// before, in a gradient buffer (worth it where transcendentals are dear: the CPU).
    pub stash: bool,
    /// Write a gradient that does not vary over positions in a sweep too, instead of
    /// leaving it to the caller (a GPU has no host loop to broadcast it).
    pub write_uniform: bool,
}

/// A sweep before its kernel is specified: reductions, inputs whose gradients it sums,
/// and gradients it writes.
type Planned = (Vec<NodeId>, Vec<usize>, Vec<Write>);

/// A loss compiled for one key: the kernels and what each sweep does.
pub(crate) struct Compiled {
    kernels: Kernels,
    /// Per sweep: what it computes, or `None` when it only runs the tail.
    sweeps: Vec<Option<Sweep>>,
    /// The tail's nodes that become computable before the first sweep (`tail[0]`) and
    /// after each (`tail[k + 1]`), in topological order; those a sweep sums are skipped.
    tail: Vec<Vec<NodeId>>,
    /// Per input: broadcast along positions (read in place, not padded).
    fixed: Vec<bool>,
}

/// Compiled kernels of one loss, by key.
pub(crate) type Cache = crate::runtime::cache::Cache<Key, Compiled>;

fn compile(loss: &Loss, key: &Key) -> Result<Compiled, Error> {
    let SweepPlan { sweeps, level, order } = plan(loss, key, PlanOptions { stash: true, write_uniform: false });
    let specs: Vec<SweepSpec> = sweeps.iter().flatten().map(|s| s.spec.clone()).collect();
    // A failure inside the code generator is an error of this loss's kernels, which the
    // runtime answers with the interpreter, not a crash of the caller.
    let kernels =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sweep::compile(loss.graph(), &specs, &key.shape)))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                Err(format!("the code generator failed: {}", why.unwrap_or_else(|| "a panic".into())))
            })
            .map_err(Error::Unsupported)?;
    let g = loss.graph();
    let mut tail = vec![Vec::new(); sweeps.len() + 1];
    for id in order.into_iter().filter(|&id| !streamed(g, id)) {
        tail[level[&id]].push(id);
    }
    Ok(Compiled { kernels, sweeps, tail, fixed: key.shape.spatial_broadcast.clone() })
}

/// Cuts the loss and its wanted gradients into sweep specs for `key`.
pub(crate) fn plan(loss: &Loss, key: &Key, options: PlanOptions) -> SweepPlan {
    let g = loss.graph();
    let roots = roots(loss, &key.want);
    let level = levels(g, &roots);
    let order = g.reachable(&roots);
    let mut count = level[&loss.root()];
    let mut writes: Vec<(usize, Write)> = Vec::new();
    let mut grad_sums: Vec<(usize, usize)> = Vec::new();
    for (i, (node, &w)) in loss.gradient_nodes().iter().zip(&key.want).enumerate() {
        let Some(n) = node.filter(|_| w) else { continue };
        let n = &n;
        let uniform = !streamed(g, *n);
        if uniform && !(options.write_uniform && loss.inputs()[i].axes.has_index(2)) {
            count = count.max(level[n]);
            continue;
        }
        count = count.max(level[n] + 1);
        if key.shape.spatial_broadcast[i] {
            grad_sums.push((level[n], i));
            continue;
        }
        let declared = loss.inputs()[i].axes.contains(AxisSet::CLASS);
        let rows = if declared && !key.one_row[i] { key.shape.classes } else { 1 };
        let sum_classes = declared && key.one_row[i] && key.shape.classes > 1;
        writes.push((level[n], Write { input: i, node: *n, rows, sum_classes, carry: false }));
    }
    let mut plans: Vec<Option<Planned>> = Vec::new();
    for k in 0..count {
        let reductions: Vec<NodeId> =
            order.iter().copied().filter(|&id| crosses_elements(g, id) && level[&id] == k + 1).collect();
        let inputs: Vec<usize> = grad_sums.iter().filter(|(l, _)| *l == k).map(|(_, i)| *i).collect();
        let w: Vec<Write> = writes.iter().filter(|(l, _)| *l == k).map(|(_, w)| w.clone()).collect();
        plans.push((!reductions.is_empty() || !inputs.is_empty() || !w.is_empty()).then_some((reductions, inputs, w)));
    }
    let sums_of = |reductions: &[NodeId], inputs: &[usize]| -> Vec<NodeId> {
        let mut sums: Vec<NodeId> = reductions.iter().map(|&r| g.node(r).args[0]).collect();
        sums.extend(inputs.iter().map(|&i| loss.gradient_nodes()[i].expect("invariant: wanted gradient")));
        sums
    };
    // Where a gradient sweep would compute again an expensive value of the sweep before
    // it, the earlier sweep leaves that value in the gradient's buffer.
    let mut stashes: Vec<Vec<(NodeId, usize)>> = vec![Vec::new(); count];
    for k in (1..count).filter(|_| options.stash) {
        let (Some(before), Some(now)) = (&plans[k - 1], &plans[k]) else { continue };
        let first = SweepSpec::new(g, sums_of(&before.0, &before.1), before.2.clone(), vec![]).body(g);
        let second = SweepSpec::new(g, sums_of(&now.0, &now.1), now.2.clone(), vec![]).body(g);
        if let Some((v, w)) = stash(g, &first, &second, &now.2, key.shape.classes) {
            stashes[k].push((v, w));
            let target = &now.2[w];
            let carry = Write { input: target.input, node: v, rows: target.rows, sum_classes: false, carry: true };
            if let Some(before) = plans[k - 1].as_mut() {
                before.2.push(carry);
            }
        }
    }
    let sweeps: Vec<Option<Sweep>> = plans
        .into_iter()
        .zip(stashes)
        .map(|(plan, stashed)| {
            plan.map(|(reductions, inputs, w)| Sweep {
                spec: SweepSpec::new(g, sums_of(&reductions, &inputs), w, stashed),
                reductions,
                grad_sums: inputs,
            })
        })
        .collect();
    SweepPlan { sweeps, level, order }
}

/// The value to carry from one sweep to the next in a gradient buffer, with the index of
/// that write: the value both sweeps compute whose computation holds the most
/// transcendental functions and divisions, if it holds any, and whose layout fits a
/// buffer (a class-varying value needs a buffer with a row per class).
fn stash(g: &Graph, first: &[NodeId], second: &[NodeId], writes: &[Write], classes: usize) -> Option<(NodeId, usize)> {
    let mut cost: HashMap<NodeId, usize> = HashMap::new();
    for &id in second {
        let n = g.node(id);
        let own = usize::from(matches!(
            n.op,
            Op::Exp
                | Op::Log
                | Op::Log1p
                | Op::Sigmoid
                | Op::Softplus
                | Op::Tanh
                | Op::Pow
                | Op::Div
                | Op::LogSumExp(_)
        ));
        let below: usize = n.args.iter().map(|a| cost.get(a).copied().unwrap_or(0)).sum();
        cost.insert(id, own + below);
    }
    let shared: Vec<NodeId> = second
        .iter()
        .copied()
        .filter(|id| first.contains(id) && !matches!(g.node(*id).op, Op::Input { .. }) && cost[id] > 0)
        .collect();
    let best = shared.iter().copied().max_by_key(|id| (cost[id], std::cmp::Reverse(*id)))?;
    let varies = g.axes(best).contains(AxisSet::CLASS) && classes > 1;
    let w = writes.iter().position(|w| !w.sum_classes && (!varies || w.rows == classes))?;
    Some((best, w))
}

/// A pointer shared by the blocks, each of which touches only its own part.
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: blocks write disjoint positions of the gradient buffers and their own partials.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// One block: a batch item and a range of spatial positions.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    s0: usize,
    len: usize,
}

/// The loss value (and requested gradients) on native kernels. The caller has checked the
/// inputs and buffers and that `unsupported` is `None`.
pub fn evaluate(loss: &Loss, inputs: &[View], ext: [usize; 3], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let g = loss.graph();
    let want: Vec<bool> = (0..inputs.len()).map(|i| grads.get(i).is_some_and(Option::is_some)).collect();
    let key = Key {
        shape: Shape {
            classes: ext[1],
            spatial_broadcast: inputs.iter().map(|v| v.shape[2] == 1 && ext[2] > 1).collect(),
        },
        one_row: inputs.iter().map(|v| v.shape[1] == 1).collect(),
        want,
    };
    let compiled = loss.native_cache().get_or_build(&key, || compile(loss, &key))?;

    // Small inputs (no spatial axis) for the tail; streamed ones are never read there.
    let owned: Vec<Tensor> = loss
        .inputs()
        .iter()
        .zip(inputs)
        .map(|(spec, v)| if spec.axes.has_index(2) { Tensor::scalar(f64::NAN) } else { v.to_tensor() })
        .collect();
    let tensors: Vec<&Tensor> = owned.iter().collect();
    let tail = |known: &mut HashMap<NodeId, Tensor>, done: usize| {
        let ready: Vec<NodeId> = compiled.tail[done].iter().copied().filter(|id| !known.contains_key(id)).collect();
        if ready.is_empty() {
            return;
        }
        let values = interp::evaluate_with(g, &ready, &tensors, ext, known);
        known.extend(ready.into_iter().zip(values));
    };
    let mut known: HashMap<NodeId, Tensor> = HashMap::new();
    tail(&mut known, 0);

    // Blocks of whole groups of four positions; a row's last `S % 4` positions are a block
    // of their own, run on scratch copies padded to four.
    let blocks: Vec<Block> = (0..ext[0])
        .flat_map(|b| {
            let whole = ext[2] / 4 * 4;
            let full = (0..whole).step_by(BLOCK).map(move |s0| Block { b, s0, len: BLOCK.min(whole - s0) });
            let rest = (whole < ext[2]).then_some(Block { b, s0: whole, len: ext[2] - whole });
            full.chain(rest)
        })
        .collect();
    let strides = |shape: [usize; 3]| -> [i64; 2] {
        let bs = if shape[0] == 1 { 0 } else { shape[1] * shape[2] };
        let cs = if shape[1] == 1 { 0 } else { shape[2] };
        [bs as i64, cs as i64]
    };
    let input_ptrs: Vec<*const f32> = inputs.iter().map(|v| v.data.as_ptr()).collect();
    let input_strides: Vec<[i64; 2]> = inputs.iter().map(|v| strides(v.shape)).collect();
    let mut kernel = 0;
    let mut summed_grads: HashMap<usize, Tensor> = HashMap::new();
    for (done, sweep) in compiled.sweeps.iter().enumerate() {
        let Some(Sweep { spec, reductions, grad_sums }) = sweep else {
            tail(&mut known, done + 1);
            continue;
        };
        let f = compiled.kernels.sweeps[kernel];
        kernel += 1;
        let c = ext[1];
        // Tail slots per batch item: `c` values per slot.
        let tails: Vec<Vec<f32>> = (0..ext[0])
            .map(|b| {
                let mut row = vec![0.0f32; spec.slots.len() * c];
                for (k, id) in spec.slots.iter().enumerate() {
                    let t = &known[id];
                    let bi = if t.shape[0] == 1 { 0 } else { b };
                    for ci in 0..c {
                        let cj = if t.shape[1] == 1 { 0 } else { ci };
                        row[k * c + ci] = t.data[bi * t.shape[1] + cj] as f32;
                    }
                }
                row
            })
            .collect();
        let grad_ptrs: Vec<*mut f32> = spec
            .writes
            .iter()
            .map(|w| grads[w.input].as_mut().expect("invariant: a wanted gradient has a buffer").as_mut_ptr())
            .collect();
        let grad_strides: Vec<[i64; 2]> = spec.writes.iter().map(|w| strides(inputs[w.input].shape)).collect();
        let cells = spec.cells(g, c);
        let per_block: usize = cells.iter().sum();
        let mut partials = vec![0.0f64; blocks.len() * per_block];
        let shared = Shared((
            input_ptrs.as_ptr(),
            input_strides.as_ptr(),
            grad_ptrs.as_ptr(),
            grad_strides.as_ptr(),
            partials.as_mut_ptr(),
        ));
        let tails = &tails;
        let fixed = &compiled.fixed;
        let run = |k: usize| {
            let s = shared;
            let (input_ptrs, input_strides, grad_ptrs, grad_strides, partials) = s.0;
            let block = blocks[k];
            // SAFETY: block k owns partials[k * per_block..(k + 1) * per_block].
            let partials = unsafe { partials.add(k * per_block) };
            let tail = tails[block.b].as_ptr();
            if block.len.is_multiple_of(4) {
                let args = Args {
                    inputs: input_ptrs,
                    input_strides,
                    grads: grad_ptrs.cast(),
                    grad_strides,
                    tail,
                    partials,
                    b: block.b as i64,
                    s0: block.s0 as i64,
                    len: block.len as i64,
                    live: 4,
                };
                // SAFETY: the kernel reads the inputs at this block's positions (in bounds:
                // the shapes were checked), its tail row, and writes its own partials and the
                // gradients at its own positions; the buffers outlive the call.
                unsafe { f(&args) };
            } else {
                // SAFETY: as above; `grad_ptrs` has one pointer per write of the spec.
                let grad_ptrs = unsafe { std::slice::from_raw_parts(grad_ptrs, spec.writes.len()) };
                run_padded(f, block, inputs, fixed, &spec.writes, grad_ptrs, tail, partials);
            }
        };
        // Each block writes only its own partials and positions, so the order does not
        // change a bit of the result.
        if ext.iter().product::<usize>() <= super::SERIAL_ELEMENTS {
            (0..blocks.len()).for_each(run);
        } else {
            (0..blocks.len()).into_par_iter().for_each(run);
        }
        let mut offset = 0;
        let sums = Sums { blocks: &blocks, partials: &partials, per_block };
        for (&r, &n) in reductions.iter().zip(&cells) {
            known.insert(r, combine(g, r, &sums, offset, n, ext));
            offset += n;
        }
        for (&i, &n) in grad_sums.iter().zip(&cells[reductions.len()..]) {
            let node = loss.gradient_nodes()[i].expect("invariant: wanted gradient");
            summed_grads
                .insert(i, gradient_sum(g, node, &loss.inputs()[i].axes, &sums, offset, n, ext, inputs[i].shape));
            offset += n;
        }
        tail(&mut known, done + 1);
    }

    for (i, (((out, spec), node), v)) in
        grads.iter_mut().zip(loss.inputs()).zip(loss.gradient_nodes()).zip(inputs).enumerate()
    {
        let Some(out) = out else { continue };
        match node {
            None => out.fill(0.0),
            Some(n) if !streamed(g, *n) => {
                let used: [usize; 3] = std::array::from_fn(|a| if spec.axes.has_index(a) { ext[a] } else { 1 });
                let t = known[n].broadcast_to(used).fit_to(v.shape);
                for (o, x) in out.iter_mut().zip(&t.data) {
                    *o = *x as f32;
                }
            }
            Some(_) => {
                // Written by the sweeps, or summed there over the positions it is broadcast along.
                if let Some(t) = summed_grads.get(&i) {
                    for (o, x) in out.iter_mut().zip(&t.data) {
                        *o = *x as f32;
                    }
                }
            }
        }
    }
    Ok(known[&loss.root()].data[0])
}

/// Runs the last `len < 4` positions of a row: inputs copied into rows of four (the last
/// position repeated), sums masked to the live lanes, gradients copied back lane by lane.
#[allow(clippy::too_many_arguments)]
fn run_padded(
    f: sweep::SweepFn,
    block: Block,
    inputs: &[View],
    fixed: &[bool],
    writes: &[Write],
    grad_ptrs: &[*mut f32],
    tail: *const f32,
    partials: *mut f64,
) {
    let pad = |shape: [usize; 3], data: &[f32]| -> Vec<f32> {
        let b = if shape[0] == 1 { 0 } else { block.b };
        (0..shape[1])
            .flat_map(|c| (0..4).map(move |k| (b, c, block.s0 + k.min(block.len - 1))))
            .map(|(b, c, s)| data[(b * shape[1] + c) * shape[2] + s])
            .collect()
    };
    let scratch: Vec<Option<Vec<f32>>> =
        inputs.iter().zip(fixed).map(|(v, &fixed)| (!fixed).then(|| pad(v.shape, v.data))).collect();
    let ptrs: Vec<*const f32> =
        scratch.iter().zip(inputs).map(|(s, v)| s.as_ref().map_or(v.data.as_ptr(), |s| s.as_ptr())).collect();
    let strides: Vec<[i64; 2]> = scratch
        .iter()
        .zip(inputs)
        .map(|(s, v)| match s {
            Some(_) => [0, if v.shape[1] == 1 { 0 } else { 4 }],
            None => [
                if v.shape[0] == 1 { 0 } else { (v.shape[1] * v.shape[2]) as i64 },
                if v.shape[1] == 1 { 0 } else { v.shape[2] as i64 },
            ],
        })
        .collect();
    // Gradient rows start as what the buffer holds: a stashed value from the sweep before.
    let mut out: Vec<Vec<f32>> = writes
        .iter()
        .zip(grad_ptrs)
        .map(|(w, &g)| {
            let shape = inputs[w.input].shape;
            (0..w.rows)
                .flat_map(|c| {
                    (0..4).map(move |k| (block.b * shape[1] + c) * shape[2] + block.s0 + k.min(block.len - 1))
                })
                // SAFETY: in the gradient buffer, at this block's positions (see below).
                .map(|at| unsafe { *g.add(at) })
                .collect()
        })
        .collect();
    let out_ptrs: Vec<*mut f32> = out.iter_mut().map(|o| o.as_mut_ptr()).collect();
    let out_strides: Vec<[i64; 2]> = writes.iter().map(|_| [0, 4]).collect();
    let args = Args {
        inputs: ptrs.as_ptr(),
        input_strides: strides.as_ptr(),
        grads: out_ptrs.as_ptr(),
        grad_strides: out_strides.as_ptr(),
        tail,
        partials,
        b: block.b as i64,
        s0: 0,
        len: 4,
        live: block.len as i64,
    };
    // SAFETY: every pointer is to a scratch row of four or (inputs fixed along positions)
    // to the input itself, read at its batch item; the scratch outlives the call.
    unsafe { f(&args) };
    for ((w, o), &g) in writes.iter().zip(&out).zip(grad_ptrs) {
        let shape = inputs[w.input].shape;
        for c in 0..w.rows {
            for k in 0..block.len {
                let at = (block.b * shape[1] + c) * shape[2] + block.s0 + k;
                // SAFETY: `at` is in the gradient buffer (shaped like the input, whose batch
                // and spatial extents are full for written gradients), at this block's
                // positions, which no other block writes.
                unsafe { *g.add(at) = o[c * 4 + k] };
            }
        }
    }
}

/// The blocks' partial sums.
struct Sums<'a> {
    blocks: &'a [Block],
    partials: &'a [f64],
    per_block: usize,
}

impl Sums<'_> {
    /// Cell `offset + c` summed in a fixed tree over the blocks (in block order) that `pick`.
    fn total(&self, offset: usize, c: usize, pick: impl Fn(usize) -> bool) -> f64 {
        let values: Vec<f64> = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, k)| pick(k.b))
            .map(|(k, _)| self.partials[k * self.per_block + offset + c])
            .collect();
        tree(&values, false)
    }
}

/// Reduction `r` from the sums of its operand (`cells` per block from `offset`).
fn combine(g: &Graph, r: NodeId, sums: &Sums, offset: usize, cells: usize, ext: [usize; 3]) -> Tensor {
    let Op::Sum(over) = g.node(r).op else { unreachable!("native reductions are sums") };
    let keeps_batch = g.axes(r).contains(AxisSet::BATCH);
    let rows = if keeps_batch { ext[0] } else { 1 };
    let mut per_cell = vec![0.0; rows * cells];
    for row in 0..rows {
        // An operand without a batch axis is the same in every batch item: count it once
        // unless the sum is over the batch.
        let pick = |b: usize| if keeps_batch { b == row } else { over.contains(AxisSet::BATCH) || b == 0 };
        for c in 0..cells {
            per_cell[row * cells + c] = sums.total(offset, c, pick);
        }
    }
    if !over.contains(AxisSet::CLASS) {
        return Tensor::new([rows, cells, 1], per_cell);
    }
    // Summed over classes too: in class order, or C copies of a class-free operand.
    let data =
        per_cell.chunks(cells).map(|row| if cells == 1 { row[0] * ext[1] as f64 } else { row.iter().sum() }).collect();
    Tensor::new([rows, 1, 1], data)
}

/// The gradient of an input broadcast along the spatial axis: its gradient node summed over
/// positions, then over the copies the input stands for (as `Loss::eval_grad` does).
#[allow(clippy::too_many_arguments)]
fn gradient_sum(
    g: &Graph,
    node: NodeId,
    axes: &AxisSet,
    sums: &Sums,
    offset: usize,
    cells: usize,
    ext: [usize; 3],
    shape: [usize; 3],
) -> Tensor {
    let per_item = g.axes(node).contains(AxisSet::BATCH);
    let rows = if per_item { ext[0] } else { 1 };
    let mut data = vec![0.0; rows * cells];
    for row in 0..rows {
        for c in 0..cells {
            data[row * cells + c] = sums.total(offset, c, |b| b == row);
        }
    }
    let used = [if axes.has_index(0) { ext[0] } else { 1 }, if axes.has_index(1) { ext[1] } else { 1 }, 1];
    Tensor::new([rows, cells, 1], data).broadcast_to(used).fit_to(shape)
}
