//! Losses with a `sorted` block (Lovász): sorts, scans and scatters on whole tensors.
//!
//! The graph is cut at the nodes that need a whole pass (`Kind`): a sort (a radix
//! sort of f32 keys, stable, per group), a gather into sorted order (of a computed
//! value; a gather of inputs reads the sort's records where it is used), a scan
//! along it, a scatter back, a reduction over a large value. Everything else is
//! either small (no more than `SMALL` values: computed by the f64 reference
//! interpreter, as the blocked runtime's tail) or elementwise, recomputed chunk by
//! chunk in every pass that needs it (`vm`). A gradient made from one sort's
//! scatters is computed in that sort's order and put back once (`Writes`). Passes run in stages: a stage runs every pass whose inputs
//! earlier stages made. Within a pass, chunks run in parallel; partial sums and scan
//! carries are combined in chunk order, so results are bitwise the same for any
//! number of threads. Values are f64 throughout; only sort keys are rounded to f32
//! (ties the rounding creates keep element order, as ties do).
//!
//! Nothing is read or written through a permutation one element at a time: on this
//! hardware such an access costs 50-90 ns, more than a pass over memory. The sort
//! carries the inputs its gathers read inside its records, and a scatter goes through
//! buckets of nearby elements (`perm`). The large buffers are kept between calls and
//! backed by huge pages where the OS allows (`pool`).

mod layout;
mod passes;
mod perm;
mod pool;
mod radix;
mod vm;

use std::collections::{HashMap, HashSet};

use crate::backend::interp;
use crate::error::Error;
use crate::ir::{Graph, NodeId, Op, Space};
use crate::loss::Loss;
use crate::tensor::{Tensor, View};

pub use pool::clear as release_buffers;

/// Values with at most this many elements (in element order) go to the interpreter.
const SMALL: usize = 1 << 14;

/// How the engine produces a node's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A small value in element order, from the reference interpreter.
    Small,
    /// Elementwise, recomputed per chunk by each pass that uses it.
    Fused,
    /// A large input, read from the caller's view.
    Input,
    /// A permutation (radix-sorted keys and element indices).
    Sort,
    /// A sorted-order column, gathered through the permutation.
    Gather,
    /// A sorted-order column: cumsum, revcumsum, prev or next.
    Scan,
    /// Sorted values put back in element order.
    Scatter,
    /// A sum over sorted values (per group).
    SortedSum,
    /// A sum or logsumexp over a large value in element order.
    Reduce,
}

impl Kind {
    /// Whether the node is made by a pass of its own (and read by later ones).
    fn is_pass(self) -> bool {
        !matches!(self, Kind::Small | Kind::Fused | Kind::Input)
    }
}

/// The number of elements of a node's value (in element order, or all for sorted ones).
fn size(g: &Graph, id: NodeId, ext: [usize; 3]) -> usize {
    let axes = g.axes(id);
    (0..3).filter(|&i| axes.has_index(i)).map(|i| ext[i]).product()
}

fn classify(g: &Graph, order: &[NodeId], ext: [usize; 3]) -> HashMap<NodeId, Kind> {
    let mut kind: HashMap<NodeId, Kind> = HashMap::new();
    for &id in order {
        let n = g.node(id);
        let small = size(g, id, ext) <= SMALL;
        // A small value the interpreter can take as known: its own or a reduction's.
        let stored_small = |a: &NodeId| {
            kind[a] == Kind::Small || (matches!(kind[a], Kind::Reduce | Kind::SortedSum) && size(g, *a, ext) <= SMALL)
        };
        let k = match n.op {
            Op::Sort { .. } => Kind::Sort,
            // Read from the sort's records where they are used, not stored (`fusable`).
            Op::Gather if fusable(g, &kind, n.args[1]) => Kind::Fused,
            Op::Gather => Kind::Gather,
            Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => Kind::Scan,
            Op::Scatter => Kind::Scatter,
            Op::Sum(_) | Op::LogSumExp(_) if g.space(n.args[0]) != Space::Elements => Kind::SortedSum,
            Op::Sum(_) | Op::LogSumExp(_) if small && stored_small(&n.args[0]) => Kind::Small,
            Op::Sum(_) | Op::LogSumExp(_) => Kind::Reduce,
            Op::Input { .. } if small => Kind::Small,
            Op::Input { .. } => Kind::Input,
            Op::Const(_) | Op::Extent(_) => Kind::Small,
            Op::ClassIndex if small => Kind::Small,
            _ if n.space == Space::Elements && small && n.args.iter().all(stored_small) => Kind::Small,
            _ => Kind::Fused,
        };
        kind.insert(id, k);
    }
    kind
}

/// Whether a gather of `value` is computed where it is read, at the sort's positions,
/// instead of by a pass that stores it: when `value` is made from inputs (carried in
/// the sort's records, `perm::MAX_CARRIED` at most) and small values only. Storing
/// the gathered f64 column and reading it back cost more than reading the records.
fn fusable(g: &Graph, kind: &HashMap<NodeId, Kind>, value: NodeId) -> bool {
    let front = frontier(g, kind, &[value]);
    let inputs = front.iter().filter(|f| kind[f] == Kind::Input).count();
    inputs <= perm::MAX_CARRIED && front.iter().all(|f| matches!(kind[f], Kind::Input | Kind::Small))
}

/// After how many stages each node's value is available; a pass node runs in stage
/// `avail - 1`.
fn availability(g: &Graph, order: &[NodeId], kind: &HashMap<NodeId, Kind>) -> HashMap<NodeId, usize> {
    let mut avail = HashMap::new();
    for &id in order {
        let below = g.node(id).args.iter().map(|a| avail[a]).max().unwrap_or(0);
        avail.insert(id, if kind[&id].is_pass() { below + 1 } else { below });
    }
    avail
}

/// Runs each scatter in the stage just before its first reader rather than as early as
/// possible, so that scatters along one sort share one pass (and one interleaved
/// buffer): a scatter moves its values through buckets in two passes over memory
/// (`perm::unsort`), whatever their number.
fn postpone_scatters(
    g: &Graph,
    order: &[NodeId],
    kind: &HashMap<NodeId, Kind>,
    roots: &[NodeId],
    avail: &mut HashMap<NodeId, usize>,
) {
    let mut first_read: HashMap<NodeId, usize> = HashMap::new();
    let mut note = |args: &[NodeId], stage: usize| {
        for id in frontier(g, kind, args) {
            let e = first_read.entry(id).or_insert(usize::MAX);
            *e = (*e).min(stage);
        }
    };
    for &id in order {
        if kind[&id].is_pass() {
            note(&g.node(id).args, avail[&id] - 1);
        }
    }
    // Gradients are written in the last stage (see `evaluate`).
    let last = order.iter().map(|id| avail[id]).max().unwrap_or(0);
    for &r in &roots[1..] {
        note(&[r], last);
    }
    for &id in order {
        if kind[&id] == Kind::Scatter {
            if let Some(&first) = first_read.get(&id).filter(|&&s| s != usize::MAX) {
                let a = avail.get_mut(&id).expect("invariant: every node has a stage");
                *a = (*a).max(first);
            }
        }
    }
}

/// The stored values a consumer of `args` reads (through fused nodes), and for
/// gathers and scatters the permutation.
fn frontier(g: &Graph, kind: &HashMap<NodeId, Kind>, args: &[NodeId]) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut out = HashSet::new();
    let mut stack = args.to_vec();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        match kind[&id] {
            Kind::Fused => stack.extend(g.node(id).args.iter().copied()),
            _ => {
                out.insert(id);
            }
        }
    }
    out
}

/// The loss value (and the requested gradients) of a loss that sorts.
/// The caller (`runtime::evaluate`) has checked inputs and buffers; `ext` is the
/// broadcast `[batch, class, spatial]`.
pub fn evaluate(loss: &Loss, inputs: &[View], ext: [usize; 3], grads: &mut [Option<&mut [f32]>]) -> Result<f64, Error> {
    let g = loss.graph();
    let wanted: Vec<(usize, Option<NodeId>)> =
        grads.iter().enumerate().filter(|(_, b)| b.is_some()).map(|(i, _)| (i, loss.gradient_nodes()[i])).collect();
    let mut roots = vec![loss.root()];
    roots.extend(wanted.iter().filter_map(|(_, n)| *n));
    let order = g.reachable(&roots);
    let kind = classify(g, &order, ext);
    let mut avail = availability(g, &order, &kind);
    postpone_scatters(g, &order, &kind, &roots, &mut avail);
    let stages = order.iter().map(|id| avail[id]).max().unwrap_or(0);
    let writes = sorted_writes(loss, inputs, ext, &order, &kind, &avail, stages, &wanted);

    // When each stored value is last read, so that its buffer goes back to the pool.
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    let mut note = |args: &[NodeId], stage: usize| {
        for id in frontier(g, &kind, args) {
            let e = last_use.entry(id).or_insert(0);
            *e = (*e).max(stage);
        }
    };
    for &id in &order {
        if kind[&id].is_pass() {
            note(&g.node(id).args, avail[&id] - 1);
        }
    }
    for &r in &roots[1..] {
        note(&[r], stages);
    }
    // A sort whose order gradients are computed in puts them back in the last stage.
    for &s in writes.by_sort.keys() {
        note(&[s], stages);
    }

    // The interpreter's inputs: small ones as f64 tensors; it never reads the others.
    let small_inputs: Vec<Tensor> = loss
        .inputs()
        .iter()
        .zip(inputs)
        .map(|(spec, v)| {
            let n: usize = (0..3).filter(|&i| spec.axes.has_index(i)).map(|i| ext[i]).product();
            if n <= SMALL {
                v.to_tensor()
            } else {
                Tensor::scalar(f64::NAN)
            }
        })
        .collect();
    let small_refs: Vec<&Tensor> = small_inputs.iter().collect();

    let cx = passes::Cx { g, ext, inputs, kind: &kind };
    let mut store = passes::Store::default();
    for stage in 0..=stages {
        // Small values whose arguments are ready.
        let ready: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|id| kind[id] == Kind::Small && avail[id] <= stage && !store.tensors.contains_key(id))
            .collect();
        if !ready.is_empty() {
            let values = interp::evaluate_with(g, &ready, &small_refs, ext, &store.tensors);
            store.tensors.extend(ready.into_iter().zip(values));
        }
        let here: Vec<NodeId> =
            order.iter().copied().filter(|id| kind[id].is_pass() && avail[id] == stage + 1).collect();
        run_stage(&cx, &mut store, &here, &writes, stage + 1 == stages);
        if stage == stages {
            put_back(&mut store, &writes, &wanted, grads);
        }
        for &(i, node) in &wanted {
            // Every gradient in the last stage, so that their scatters share one pass.
            let elsewhere = |n: &NodeId| kind[n] != Kind::Small && !writes.sort_of.contains_key(n);
            if let Some(n) = node.filter(|n| stage == stages && elsewhere(n)) {
                let out = grads[i].as_deref_mut().expect("invariant: wanted buffers are present");
                passes::write(&cx, &store, n, loss.inputs()[i].axes, inputs[i].shape, out);
            }
        }
        let done: Vec<NodeId> = last_use.iter().filter(|(_, &s)| s <= stage).map(|(id, _)| *id).collect();
        for id in done {
            last_use.remove(&id);
            store.release(id);
        }
    }
    for &(i, node) in &wanted {
        let out = grads[i].as_deref_mut().expect("invariant: wanted buffers are present");
        match node {
            Some(n) if kind[&n] == Kind::Small => {
                let used: [usize; 3] =
                    std::array::from_fn(|a| if loss.inputs()[i].axes.has_index(a) { ext[a] } else { 1 });
                let t = store.tensors[&n].broadcast_to(used).fit_to(inputs[i].shape);
                out.iter_mut().zip(&t.data).for_each(|(o, v)| *o = *v as f32);
            }
            Some(_) => {}
            None => out.fill(0.0),
        }
    }
    let value = store.tensors[&loss.root()].data[0];
    store.release_all();
    Ok(value)
}

/// Gradients computed in a sort's order. A gradient made from one sort's scatters, run
/// in the stage before the last, and from inputs and values known before that stage
/// (lovasz_hinge's d/dx = (2y - 1) * -scatter(...)) is computed by that sort's last
/// pass at its positions, where each scatter is its argument, and put back in element
/// order once, as f32: half the bytes of staging each scatter's f64 values, putting
/// those back and reading them again in a pass of its own.
#[derive(Default)]
struct Writes {
    /// Per sort, the gradient nodes computed in its order.
    by_sort: HashMap<NodeId, Vec<NodeId>>,
    /// The sort of each of those gradient nodes.
    sort_of: HashMap<NodeId, NodeId>,
    /// The scatters only those gradients read: never staged.
    absorbed: HashSet<NodeId>,
}

#[allow(clippy::too_many_arguments)]
fn sorted_writes(
    loss: &Loss,
    inputs: &[View],
    ext: [usize; 3],
    order: &[NodeId],
    kind: &HashMap<NodeId, Kind>,
    avail: &HashMap<NodeId, usize>,
    stages: usize,
    wanted: &[(usize, Option<NodeId>)],
) -> Writes {
    let g = loss.graph();
    let mut w = Writes::default();
    // The sort to write each wanted gradient node in, if every input with that node (two
    // inputs can share one, as x and b in f(x + b)) takes it whole, unbroadcast.
    let mut sort_of: HashMap<NodeId, Option<NodeId>> = HashMap::new();
    for &(i, node) in wanted {
        let Some(n) = node.filter(|n| kind[n] != Kind::Small) else { continue };
        let used: [usize; 3] = std::array::from_fn(|a| if loss.inputs()[i].axes.has_index(a) { ext[a] } else { 1 });
        let front = frontier(g, kind, &[n]);
        let sorts: HashSet<NodeId> =
            front.iter().filter(|f| kind[f] == Kind::Scatter).map(|&f| g.node(f).args[0]).collect();
        let known = |f: &NodeId| match kind[f] {
            Kind::Scatter => avail[f] == stages,
            Kind::Small | Kind::Reduce | Kind::SortedSum | Kind::Input => avail[f] < stages,
            _ => false,
        };
        let whole = inputs[i].shape == ext && used == ext;
        let sort = sorts.iter().next().copied().filter(|_| whole && sorts.len() == 1 && front.iter().all(known));
        let entry = sort_of.entry(n).or_insert(sort);
        *entry = entry.and(sort);
    }
    for &(_, node) in wanted {
        if let Some((n, Some(s))) = node.and_then(|n| sort_of.get(&n).map(|s| (n, *s))) {
            if !w.sort_of.contains_key(&n) {
                w.by_sort.entry(s).or_default().push(n);
                w.sort_of.insert(n, s);
            }
        }
    }
    // Scatters read by anything else are staged as usual.
    let mut elsewhere: HashSet<NodeId> = HashSet::new();
    for &id in order {
        if kind[&id].is_pass() {
            elsewhere.extend(frontier(g, kind, &g.node(id).args));
        }
    }
    for &(_, node) in wanted {
        if let Some(n) = node.filter(|n| !w.sort_of.contains_key(n)) {
            elsewhere.extend(frontier(g, kind, &[n]));
        }
    }
    elsewhere.extend(frontier(g, kind, &[loss.root()]));
    let written: Vec<NodeId> = w.sort_of.keys().copied().collect();
    w.absorbed = frontier(g, kind, &written)
        .into_iter()
        .filter(|f| kind[f] == Kind::Scatter && !elsewhere.contains(f))
        .collect();
    w
}

/// Puts the gradients computed in a sort's order into the caller's buffers.
fn put_back(
    store: &mut passes::Store,
    writes: &Writes,
    wanted: &[(usize, Option<NodeId>)],
    grads: &mut [Option<&mut [f32]>],
) {
    for (s, nodes) in &writes.by_sort {
        let mut staged: Vec<&[f32]> = Vec::new();
        let mut outs: Vec<&mut [f32]> = Vec::new();
        for (i, buf) in grads.iter_mut().enumerate() {
            let node = wanted.iter().find(|(j, _)| *j == i).and_then(|(_, n)| *n);
            if let (Some(n), Some(out)) = (node.filter(|n| nodes.contains(n)), buf.as_deref_mut()) {
                staged.push(&store.sorted_grads[&n]);
                outs.push(out);
            }
        }
        perm::put_back(&store.sorts[s].perm, &staged, &mut outs);
    }
}

/// Runs the passes of one stage: sorts, then per sort its gathers together and its
/// scans, scatters and sums together (in the stage before the last, with the
/// gradients computed in its order), then reductions one by one.
fn run_stage(cx: &passes::Cx, store: &mut passes::Store, here: &[NodeId], writes: &Writes, last: bool) {
    let g = cx.g;
    let of = |k: Kind| here.iter().copied().filter(move |id| cx.kind[id] == k);
    for id in of(Kind::Sort) {
        let sorted = perm::sort(cx, store, id);
        store.sorts.insert(id, sorted);
    }
    let mut sorts: Vec<NodeId> = here
        .iter()
        .filter(|id| matches!(cx.kind[id], Kind::Gather | Kind::Scan | Kind::Scatter | Kind::SortedSum))
        .map(|&id| sort_of(g, id))
        .collect();
    sorts.sort();
    sorts.dedup();
    for s in sorts {
        let gathers: Vec<NodeId> = of(Kind::Gather).filter(|&id| sort_of(g, id) == s).collect();
        if !gathers.is_empty() {
            let cols = passes::gather(cx, store, s, &gathers);
            store.columns.extend(gathers.into_iter().zip(cols));
        }
        let along: Vec<NodeId> = here
            .iter()
            .copied()
            .filter(|id| matches!(cx.kind[id], Kind::Scan | Kind::Scatter | Kind::SortedSum) && sort_of(g, *id) == s)
            .filter(|id| !writes.absorbed.contains(id))
            .collect();
        let written = writes.by_sort.get(&s).filter(|_| last).map_or(&[][..], |v| &v[..]);
        if !along.is_empty() || !written.is_empty() {
            passes::along(cx, store, s, &along, written);
        }
    }
    for id in of(Kind::Reduce) {
        let t = passes::reduce_node(cx, store, id);
        store.tensors.insert(id, t);
    }
}

/// The sort a sorted-order node belongs to.
fn sort_of(g: &Graph, id: NodeId) -> NodeId {
    let n = g.node(id);
    match n.op {
        Op::Sum(_) | Op::LogSumExp(_) => match g.space(n.args[0]) {
            Space::Sorted(s) => s,
            other => panic!("invariant: a sorted sum of a value in {other:?}"),
        },
        _ => n.args[0],
    }
}
