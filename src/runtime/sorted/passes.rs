//! The passes: each walks fixed chunks in parallel, runs a `Program` per chunk, and
//! stores what the later passes read.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::ir::{AxisSet, Graph, NodeId, Op};
use crate::tensor::{Tensor, View};

use super::perm::{self, split, Sorted};
use super::pool;
use super::vm::{At, Column, Loc, Program, Read, Scattered, Source, Sources, CHUNK};
use super::Kind;

/// What every pass needs to know about the call.
pub struct Cx<'a> {
    pub g: &'a Graph,
    pub ext: [usize; 3],
    pub inputs: &'a [View<'a>],
    pub kind: &'a HashMap<NodeId, Kind>,
}

impl Cx<'_> {
    /// The program computing `roots` from stored values.
    pub fn program(&self, roots: &[NodeId]) -> Program {
        self.program_at(roots, None)
    }

    /// The same, run at the positions of `sort` (if given): there a scatter along it
    /// is its argument.
    pub fn program_at(&self, roots: &[NodeId], sort: Option<NodeId>) -> Program {
        let source = |id: NodeId| -> Source {
            let n = self.g.node(id);
            match self.kind[&id] {
                Kind::Small | Kind::Reduce | Kind::SortedSum => Source::Read(Read::Tensor(id)),
                Kind::Input => match n.op {
                    Op::Input { index, .. } => Source::Read(Read::Input(index as usize)),
                    other => panic!("invariant: an input node, not {other:?}"),
                },
                Kind::Scatter if Some(n.args[0]) == sort => Source::Same(n.args[1]),
                Kind::Scatter => Source::Read(Read::Scattered(id)),
                Kind::Gather | Kind::Scan => Source::Read(Read::Column(id)),
                Kind::Fused if n.op == Op::ClassIndex => Source::Read(Read::ClassIndex),
                Kind::Fused if n.op == Op::Gather && Some(n.args[0]) == sort => Source::Same(n.args[1]),
                Kind::Fused => Source::Compute,
                Kind::Sort => panic!("invariant: a permutation is not a value"),
            }
        };
        Program::compile(self.g, roots, &source)
    }
}

/// The values made so far.
#[derive(Default)]
pub struct Store {
    pub tensors: HashMap<NodeId, Tensor>,
    pub columns: HashMap<NodeId, Column>,
    pub scattered: HashMap<NodeId, Scattered>,
    pub sorts: HashMap<NodeId, Sorted>,
    /// Gradients computed in a sort's order (`along`'s writes), to be put back.
    pub sorted_grads: HashMap<NodeId, Vec<f32>>,
}

impl Store {
    pub fn sources<'a>(&'a self, cx: &'a Cx) -> Sources<'a> {
        Sources {
            ext: cx.ext,
            inputs: cx.inputs,
            tensors: &self.tensors,
            columns: &self.columns,
            scattered: &self.scattered,
        }
    }

    /// Gives a value's large buffers back to the pool (small tensors stay).
    pub fn release(&mut self, id: NodeId) {
        if let Some(c) = self.columns.remove(&id) {
            pool::give(c.data);
        }
        if let Some(s) = self.scattered.remove(&id) {
            // The last scatter sharing the buffer gives it back.
            if let Ok(buf) = std::sync::Arc::try_unwrap(s.buf) {
                pool::give(buf);
            }
        }
        if let Some(s) = self.sorts.get_mut(&id) {
            s.perm.release();
        }
        if let Some(v) = self.sorted_grads.remove(&id) {
            pool::give(v);
        }
    }

    pub fn release_all(&mut self) {
        let ids: Vec<NodeId> = (self.columns.keys().chain(self.scattered.keys()))
            .chain(self.sorts.keys().chain(self.sorted_grads.keys()))
            .copied()
            .collect();
        for id in ids {
            self.release(id);
        }
    }
}

/// `cols[c][k]` regrouped as `out[k][c]`.
fn transpose<T>(cols: Vec<Vec<T>>, n: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..n).map(|_| Vec::with_capacity(cols.len())).collect();
    for col in cols {
        for (k, x) in col.into_iter().enumerate() {
            out[k].push(x);
        }
    }
    out
}

/// Value `k` of a slot that holds one value or one per position.
pub fn at(v: &[f64], k: usize) -> f64 {
    if v.len() == 1 {
        v[0]
    } else {
        v[k]
    }
}

/// Gathers element-order values into the sort's order (one column per node): each
/// is computed at sorted positions, reading the inputs the sort carried in sorted
/// order and anything else at the element indices (see `perm`).
pub fn gather(cx: &Cx, store: &Store, sort: NodeId, nodes: &[NodeId]) -> Vec<Column> {
    let sorted = &store.sorts[&sort];
    let layout = &sorted.layout;
    let args: Vec<NodeId> = nodes.iter().map(|&id| cx.g.node(id).args[1]).collect();
    let prog = cx.program(&args);
    let src = store.sources(cx);
    let mut cols: Vec<Vec<f64>> = nodes.iter().map(|_| pool::take::<f64>(layout.len())).collect();
    let pieces: Vec<Vec<&mut [f64]>> = cols.iter_mut().map(|c| split(c, &layout.segments, 1)).collect();
    transpose(pieces, layout.segments.len()).into_par_iter().zip(layout.segments.par_iter().enumerate()).for_each_init(
        || (prog.slots(), Vec::new(), Vec::new()),
        |(slots, idx, carried), (outs, (si, seg))| {
            sorted.perm.indices(seg.q0, seg.len, idx);
            sorted.perm.carried(seg.q0, seg.len, carried);
            let at_chunk = At { elements: Loc::List(idx), q0: seg.q0, len: seg.len, segment: si, carried };
            prog.run(&src, &at_chunk, slots);
            for (out, &o) in outs.into_iter().zip(&prog.outputs) {
                let v = &slots[o];
                for (k, x) in out.iter_mut().enumerate() {
                    *x = at(v, k);
                }
            }
        },
    );
    cols.into_iter().map(|data| Column { data, carry: None }).collect()
}

/// The passes along a sort's order: scans, scatters and per-group sums, together;
/// and `writes`, gradients computed at the sort's positions (their scatters along it
/// are their arguments there), kept in `store.sorted_grads` to be put back.
pub fn along(cx: &Cx, store: &mut Store, sort: NodeId, nodes: &[NodeId], writes: &[NodeId]) {
    let g = cx.g;
    let ops: Vec<Op> = nodes.iter().map(|&id| g.node(id).op).collect();
    let mut roots: Vec<NodeId> = nodes
        .iter()
        .map(|&id| {
            let n = g.node(id);
            if n.args.len() == 2 {
                n.args[1]
            } else {
                n.args[0]
            }
        })
        .collect();
    roots.extend(writes);
    let prog = cx.program_at(&roots, Some(sort));
    // Gathered values and gradients are read at the elements themselves; otherwise
    // element-order values are constant within the group, read once at its point.
    let at_elements = prog.aliases();
    let sorted = &store.sorts[&sort];
    let layout = &sorted.layout;
    let segments = &layout.segments;
    let n = layout.len();
    let is_scan = |op: &Op| matches!(op, Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next);
    let mut cols: Vec<Vec<f64>> = ops.iter().filter(|op| is_scan(op)).map(|_| pool::take::<f64>(n)).collect();
    // Scattered values are staged in sorted order, interleaved, then put in element order.
    let stride = ops.iter().filter(|op| **op == Op::Scatter).count();
    let mut staged: Vec<f64> = if stride > 0 { pool::take(n * stride) } else { Vec::new() };
    let mut grads: Vec<Vec<f32>> = writes.iter().map(|_| pool::take::<f32>(n)).collect();
    let src = store.sources(cx);
    let mut pieces: Vec<Vec<&mut [f64]>> = cols.iter_mut().map(|c| split(c, segments, 1)).collect();
    if stride > 0 {
        pieces.push(split(&mut staged, segments, stride));
    }
    let grad_pieces: Vec<Vec<&mut [f32]>> = grads.iter_mut().map(|c| split(c, segments, 1)).collect();
    // Per segment: a scan's total or edge value, a sum's partial (0 for scatters).
    let extras: Vec<Vec<f64>> = transpose(pieces, segments.len())
        .into_par_iter()
        .zip(transpose(grad_pieces, segments.len()))
        .zip(segments.par_iter().enumerate())
        .map_init(
            || (prog.slots(), Vec::new(), Vec::new()),
            |(slots, idx, carried), ((mut outs, grad_outs), (si, seg))| {
                let point = [layout.point(seg.group)];
                let elements = if at_elements {
                    sorted.perm.indices(seg.q0, seg.len, idx);
                    sorted.perm.carried(seg.q0, seg.len, carried);
                    &idx[..]
                } else {
                    &point[..]
                };
                let at_chunk = At { elements: Loc::List(elements), q0: seg.q0, len: seg.len, segment: si, carried };
                prog.run(&src, &at_chunk, slots);
                for (out, &o) in grad_outs.into_iter().zip(&prog.outputs[ops.len()..]) {
                    let v = &slots[o];
                    for (k, x) in out.iter_mut().enumerate() {
                        *x = at(v, k) as f32;
                    }
                }
                let (mut col, mut sc) = (0, 0);
                let mut extra = Vec::with_capacity(ops.len());
                for (op, &o) in ops.iter().zip(&prog.outputs) {
                    let v = &slots[o];
                    let len = seg.len;
                    extra.push(match op {
                        Op::Cumsum | Op::RevCumsum | Op::Prev(_) | Op::Next => {
                            let out = &mut outs[col];
                            col += 1;
                            scan_segment(*op, v, out)
                        }
                        Op::Scatter => {
                            let staged = outs.last_mut().expect("invariant: scatters have a staging piece");
                            for (k, row) in staged.chunks_exact_mut(stride).enumerate() {
                                row[sc] = at(v, k);
                            }
                            sc += 1;
                            0.0
                        }
                        _ => sum(v, len),
                    });
                }
                extra
            },
        )
        .collect();
    store.sorted_grads.extend(writes.iter().copied().zip(grads));
    // Fix-ups in segment order: scan carries, segment edges, per-group sums.
    let mut col = cols.into_iter();
    let scattered = if stride > 0 { perm::unsort(&sorted.perm, &staged, stride) } else { Vec::new() };
    pool::give(staged);
    let (buf, mut offset) = (std::sync::Arc::new(scattered), 0);
    for (j, (&id, op)) in nodes.iter().zip(&ops).enumerate() {
        let first = |si: usize| segments[si].q0 == segments[si].group * layout.size;
        let last = |si: usize| si + 1 == segments.len() || first(si + 1);
        match op {
            Op::Cumsum | Op::RevCumsum => {
                let mut carry = vec![0.0; segments.len()];
                let mut run = 0.0;
                let walk: Box<dyn Iterator<Item = usize>> =
                    if *op == Op::Cumsum { Box::new(0..segments.len()) } else { Box::new((0..segments.len()).rev()) };
                for si in walk {
                    let starts = if *op == Op::Cumsum { first(si) } else { last(si) };
                    if starts {
                        run = 0.0;
                    }
                    carry[si] = run;
                    run += extras[si][j];
                }
                let data = col.next().expect("invariant: one column per scan");
                store.columns.insert(id, Column { data, carry: Some(carry) });
            }
            Op::Prev(init) => {
                let mut data = col.next().expect("invariant: one column per scan");
                for (si, seg) in segments.iter().enumerate() {
                    data[seg.q0] = if first(si) { f64::from_bits(*init) } else { extras[si - 1][j] };
                }
                store.columns.insert(id, Column { data, carry: None });
            }
            Op::Next => {
                let mut data = col.next().expect("invariant: one column per scan");
                for (si, seg) in segments.iter().enumerate() {
                    data[seg.q0 + seg.len - 1] = if last(si) { 0.0 } else { extras[si + 1][j] };
                }
                store.columns.insert(id, Column { data, carry: None });
            }
            Op::Scatter => {
                store.scattered.insert(id, Scattered { buf: buf.clone(), stride, offset });
                offset += 1;
            }
            _ => {
                let shape = shape_of(g, id, cx.ext);
                let mut t = Tensor::filled(shape, 0.0);
                for (si, seg) in segments.iter().enumerate() {
                    let gc = layout.group_coords(seg.group);
                    let c: [usize; 3] = std::array::from_fn(|i| if shape[i] > 1 { gc[i] } else { 0 });
                    t.data[(c[0] * shape[1] + c[1]) * shape[2] + c[2]] += extras[si][j];
                }
                store.tensors.insert(id, t);
            }
        }
    }
}

/// One segment of a scan, local to the segment; returns what the fix-up needs: the
/// total (cumsums), the last value (prev) or the first (next). Edges are fixed later.
fn scan_segment(op: Op, v: &[f64], out: &mut [f64]) -> f64 {
    let len = out.len();
    match op {
        Op::Cumsum => {
            let mut acc = 0.0;
            for (k, o) in out.iter_mut().enumerate() {
                acc += at(v, k);
                *o = acc;
            }
            acc
        }
        Op::RevCumsum => {
            let mut acc = 0.0;
            for (k, o) in out.iter_mut().enumerate().rev() {
                acc += at(v, k);
                *o = acc;
            }
            acc
        }
        Op::Prev(_) => {
            for (k, o) in out.iter_mut().enumerate().skip(1) {
                *o = at(v, k - 1);
            }
            at(v, len - 1)
        }
        Op::Next => {
            for (k, o) in out[..len - 1].iter_mut().enumerate() {
                *o = at(v, k + 1);
            }
            at(v, 0)
        }
        other => unreachable!("not a scan: {other:?}"),
    }
}

/// A sum in a fixed order (four interleaved partial sums, for speed).
fn sum(v: &[f64], len: usize) -> f64 {
    if v.len() == 1 {
        return v[0] * len as f64;
    }
    let mut acc = [0.0f64; 4];
    let mut quads = v.chunks_exact(4);
    for q in &mut quads {
        for i in 0..4 {
            acc[i] += q[i];
        }
    }
    let tail: f64 = quads.remainder().iter().sum();
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail
}

/// A node's value shape in element order: the extents of its axes, 1 elsewhere.
fn shape_of(g: &Graph, id: NodeId, ext: [usize; 3]) -> [usize; 3] {
    let axes = g.axes(id);
    std::array::from_fn(|i| if axes.has_index(i) { ext[i] } else { 1 })
}

/// A running logsumexp: maximum and sum of exp(x - maximum); `m` NaN once a NaN is seen.
#[derive(Clone, Copy, Debug)]
struct Lse {
    m: f64,
    s: f64,
}

const EMPTY: Lse = Lse { m: f64::NEG_INFINITY, s: 0.0 };

impl Lse {
    fn of(xs: &[f64], copies: usize) -> Lse {
        if xs.iter().any(|x| x.is_nan()) {
            return Lse { m: f64::NAN, s: 0.0 };
        }
        let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m.is_infinite() {
            return Lse { m, s: 0.0 };
        }
        Lse { m, s: xs.iter().map(|x| (x - m).exp()).sum::<f64>() * copies as f64 }
    }

    fn merge(self, o: Lse) -> Lse {
        if self.m.is_nan() || o.m.is_nan() {
            return Lse { m: f64::NAN, s: 0.0 };
        }
        if o.m == f64::NEG_INFINITY {
            return self;
        }
        if self.m == f64::NEG_INFINITY {
            return o;
        }
        let m = self.m.max(o.m);
        if m == f64::INFINITY {
            return Lse { m, s: 0.0 };
        }
        Lse { m, s: self.s * (self.m - m).exp() + o.s * (o.m - m).exp() }
    }

    /// The reference's value: NaN, an infinite maximum, or m + log(copies * sum).
    fn finish(self, copies: f64) -> f64 {
        if self.m.is_nan() || self.m.is_infinite() {
            self.m
        } else {
            self.m + (self.s * copies).ln()
        }
    }
}

/// A reduction's running value: a sum or a logsumexp.
#[derive(Clone, Copy, Debug)]
enum Acc {
    Sum(f64),
    Lse(Lse),
}

impl Acc {
    fn empty(lse: bool) -> Acc {
        if lse {
            Acc::Lse(EMPTY)
        } else {
            Acc::Sum(0.0)
        }
    }
    fn of(xs: &[f64], len: usize, lse: bool) -> Acc {
        if lse {
            let copies = if xs.len() == 1 { len } else { 1 };
            Acc::Lse(Lse::of(xs, copies))
        } else {
            Acc::Sum(sum(xs, len))
        }
    }
    fn merge(self, o: Acc) -> Acc {
        match (self, o) {
            (Acc::Sum(a), Acc::Sum(b)) => Acc::Sum(a + b),
            (Acc::Lse(a), Acc::Lse(b)) => Acc::Lse(a.merge(b)),
            _ => unreachable!("one reduction has one kind of accumulator"),
        }
    }
    fn finish(self, copies: f64) -> f64 {
        match self {
            Acc::Sum(s) => s * copies,
            Acc::Lse(l) => l.finish(copies),
        }
    }
}

/// A sum or logsumexp over a large value in element order.
pub fn reduce_node(cx: &Cx, store: &Store, id: NodeId) -> Tensor {
    let n = cx.g.node(id);
    let (over, lse) = match n.op {
        Op::Sum(over) => (over, false),
        Op::LogSumExp(over) => (over, true),
        other => panic!("invariant: a reduction, not {other:?}"),
    };
    let arg = n.args[0];
    let axes = cx.g.axes(arg);
    // An axis reduced but not varied over counts each value that many times (as the reference).
    let copies: f64 = (0..3).filter(|&i| over.has_index(i) && !axes.has_index(i)).map(|i| cx.ext[i] as f64).product();
    let prog = cx.program(&[arg]);
    reduce(cx, store, &prog, shape_of(cx.g, arg, cx.ext), over, copies, lse)
}

/// Element positions of flat indices `j0..j0 + len` of domain `d` (each axis 1 or the extent).
fn domain_loc<'b>(d: [usize; 3], ext: [usize; 3], j0: usize, len: usize, buf: &'b mut Vec<usize>) -> Loc<'b> {
    if d == ext {
        return Loc::Range { start: j0, len };
    }
    let flat = |j: usize| {
        let (b, c, s) = (j / (d[1] * d[2]), (j / d[2]) % d[1], j % d[2]);
        (b * ext[1] + c) * ext[2] + s
    };
    let (first, last) = (flat(j0), flat(j0 + len - 1));
    if last - first == len - 1 {
        return Loc::Range { start: first, len };
    }
    buf.clear();
    buf.extend((j0..j0 + len).map(flat));
    Loc::List(buf)
}

/// Reduces the program's one output, evaluated over domain `d`, over the axes `over`.
fn reduce(cx: &Cx, store: &Store, prog: &Program, d: [usize; 3], over: AxisSet, copies: f64, lse: bool) -> Tensor {
    let ext = cx.ext;
    let src = store.sources(cx);
    let o: [usize; 3] = std::array::from_fn(|i| if over.has_index(i) { 1 } else { d[i] });
    let out = prog.outputs[0];
    if d[2] > 1 && !over.has_index(2) {
        // Spatial positions kept: each chunk is a run of them in one output row,
        // accumulated over the reduced batch and class indices in order.
        let rows: Vec<(usize, usize, usize)> =
            (0..o[0] * o[1]).flat_map(|r| (0..d[2]).step_by(CHUNK).map(move |s0| (r / o[1], r % o[1], s0))).collect();
        let parts: Vec<Vec<f64>> = rows
            .par_iter()
            .map_init(
                || prog.slots(),
                |slots, &(ob, oc, s0)| {
                    let len = CHUNK.min(d[2] - s0);
                    let mut acc = vec![Acc::empty(lse); len];
                    let bs = if over.has_index(0) { 0..d[0] } else { ob..ob + 1 };
                    for b in bs {
                        let cs = if over.has_index(1) { 0..d[1] } else { oc..oc + 1 };
                        for c in cs {
                            let start = (b * ext[1] + c) * ext[2] + s0;
                            prog.run(&src, &At::elements(Loc::Range { start, len }, len), slots);
                            let v = &slots[out];
                            for (k, a) in acc.iter_mut().enumerate() {
                                *a = a.merge(Acc::of(&[at(v, k)], 1, lse));
                            }
                        }
                    }
                    acc.into_iter().map(|a| a.finish(copies)).collect()
                },
            )
            .collect();
        return Tensor::new(o, parts.concat());
    }
    // Spatial positions reduced (or a single one): per chunk, one partial per run of
    // positions sharing an output cell, combined in chunk order.
    let total: usize = d.iter().product();
    let chunks: Vec<usize> = (0..total).step_by(CHUNK).collect();
    let parts: Vec<Vec<(usize, Acc)>> = chunks
        .par_iter()
        .map_init(
            || (prog.slots(), Vec::new()),
            |(slots, idx), &j0| {
                let len = CHUNK.min(total - j0);
                let loc = domain_loc(d, ext, j0, len, idx);
                prog.run(&src, &At::elements(loc, len), slots);
                let v = &slots[out];
                let mut part = Vec::new();
                let mut k = 0;
                while k < len {
                    let j = j0 + k;
                    let run = (d[2] - j % d[2]).min(len - k);
                    let (b, c, s) = (j / (d[1] * d[2]), (j / d[2]) % d[1], j % d[2]);
                    let pick = |i: usize, x: usize| if over.has_index(i) { 0 } else { x };
                    let cell = (pick(0, b) * o[1] + pick(1, c)) * o[2] + pick(2, s);
                    let piece = if v.len() == 1 { &v[..] } else { &v[k..k + run] };
                    part.push((cell, Acc::of(piece, run, lse)));
                    k += run;
                }
                part
            },
        )
        .collect();
    let mut cells = vec![Acc::empty(lse); o.iter().product()];
    for (cell, acc) in parts.into_iter().flatten() {
        cells[cell] = cells[cell].merge(acc);
    }
    Tensor::new(o, cells.into_iter().map(|a| a.finish(copies)).collect())
}

/// Writes the gradient `node` of an input (declared over `axes`, given with `shape`)
/// into the caller's buffer, summing over the copies of a broadcast input.
pub fn write(cx: &Cx, store: &Store, node: NodeId, axes: AxisSet, shape: [usize; 3], buf: &mut [f32]) {
    let ext = cx.ext;
    let used: [usize; 3] = std::array::from_fn(|i| if axes.has_index(i) { ext[i] } else { 1 });
    let prog = cx.program(&[node]);
    if shape != used {
        let over = (0..3).filter(|&i| shape[i] == 1 && used[i] > 1).fold(AxisSet::NONE, |a, i| a.union(AXIS[i]));
        let t = reduce(cx, store, &prog, used, over, 1.0, false);
        buf.iter_mut().zip(&t.data).for_each(|(o, v)| *o = *v as f32);
        return;
    }
    let src = store.sources(cx);
    buf.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || (prog.slots(), Vec::new()),
        |(slots, idx), (k, out)| {
            let loc = domain_loc(shape, ext, k * CHUNK, out.len(), idx);
            prog.run(&src, &At::elements(loc, out.len()), slots);
            let v = &slots[prog.outputs[0]];
            for (i, o) in out.iter_mut().enumerate() {
                *o = at(v, i) as f32;
            }
        },
    );
}

const AXIS: [AxisSet; 3] = [AxisSet::BATCH, AxisSet::CLASS, AxisSet::SPATIAL];
