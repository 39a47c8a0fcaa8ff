//! Evaluates the elementwise part of a pass one chunk at a time.
//!
//! A `Program` is the list of elementwise nodes a pass needs, in topological order,
//! down to values that are already stored (inputs, small tensors, sorted columns,
//! scatter results). Running it on a chunk (a few thousand positions) fills one
//! buffer ("slot") per node, so intermediates stay in cache and nothing full-length
//! is allocated. A slot holds either one value per position or a single value that
//! broadcasts (a scalar, or a value constant along the chunk); ops broadcast.
//! Every op is computed in f64, with the reference evaluator's scalar meaning.

use std::collections::HashMap;

use crate::ir::{Graph, NodeId, Op};
use crate::tensor::{Tensor, View};

/// Positions per chunk: about ten live f64 slots of this size fit in L2.
pub const CHUNK: usize = 2048;

/// A stored value a program reads.
#[derive(Clone, Copy, Debug)]
pub enum Read {
    /// A (large) input, from the caller's f32 view.
    Input(usize),
    /// A tensor in element order: a small value or a reduction's result.
    Tensor(NodeId),
    /// The result of a scatter, in element order.
    Scattered(NodeId),
    /// A sorted-order column, at the chunk's sorted positions.
    Column(NodeId),
    /// The class index (only when there are too many classes to keep it as a tensor).
    ClassIndex,
}

/// A materialized sorted-order value: one f64 per sorted position. A scan stores
/// its running sums per segment and the carry into each segment separately; a
/// read adds them.
pub struct Column {
    pub data: Vec<f64>,
    pub carry: Option<Vec<f64>>,
}

/// Scatter results, several interleaved in one buffer (value `offset` of each row of
/// `stride`), so that a scatter writes one cache line per element, not several.
pub struct Scattered {
    pub buf: std::sync::Arc<Vec<f64>>,
    pub stride: usize,
    pub offset: usize,
}

/// Everything a program can read.
pub struct Sources<'a> {
    pub ext: [usize; 3],
    pub inputs: &'a [View<'a>],
    pub tensors: &'a HashMap<NodeId, Tensor>,
    pub columns: &'a HashMap<NodeId, Column>,
    pub scattered: &'a HashMap<NodeId, Scattered>,
}

/// Element positions (flat `[batch, class, spatial]` indices into the broadcast shape).
#[derive(Clone, Copy, Debug)]
pub enum Loc<'a> {
    Range { start: usize, len: usize },
    List(&'a [usize]),
}

impl Loc<'_> {
    pub fn get(&self, k: usize) -> usize {
        match self {
            Loc::Range { start, .. } => start + k,
            Loc::List(l) => l[k],
        }
    }
}

/// Where a chunk is: element-order values are read at `elements`; sorted-order
/// values at positions `q0..q0 + len` of segment number `segment`. `carried` holds
/// inputs already read at `elements` (carried through a sort in sorted order), as
/// (input index, one value per element): these are read from there, not the input.
#[derive(Clone, Copy, Debug)]
pub struct At<'a> {
    pub elements: Loc<'a>,
    pub q0: usize,
    pub len: usize,
    pub segment: usize,
    pub carried: &'a [(usize, Vec<f32>)],
}

impl<'a> At<'a> {
    /// A chunk of element positions only (no sorted-order values, nothing carried).
    pub fn elements(elements: Loc<'a>, len: usize) -> At<'a> {
        At { elements, q0: 0, len, segment: 0, carried: &[] }
    }
}

/// How a program gets a node's value.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// Read it from a stored value.
    Read(Read),
    /// Compute it (an elementwise op of its arguments).
    Compute,
    /// It equals another node's value here: at a sort's positions, a gather or scatter
    /// along it is its value argument.
    Same(NodeId),
}

#[derive(Clone, Copy, Debug)]
enum What {
    Read(Read),
    Map(Op),
    Copy,
}

#[derive(Clone, Debug)]
struct Step {
    what: What,
    args: [usize; 3],
    out: usize,
}

/// The elementwise nodes of a pass, in order, with a slot each (slots are reused
/// once a value is dead).
#[derive(Clone, Debug)]
pub struct Program {
    steps: Vec<Step>,
    slots: usize,
    /// The slot holding each root's value after `run`.
    pub outputs: Vec<usize>,
}

impl Program {
    /// The program for `roots`; `source` says how each node gets its value.
    pub fn compile(g: &Graph, roots: &[NodeId], source: &dyn Fn(NodeId) -> Source) -> Program {
        let mut need = vec![false; g.len()];
        let mut how: HashMap<NodeId, (What, Vec<NodeId>)> = HashMap::new();
        let mut stack = roots.to_vec();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut need[id.0 as usize], true) {
                continue;
            }
            let n = g.node(id);
            let (what, args) = match source(id) {
                Source::Read(r) => (What::Read(r), vec![]),
                Source::Compute => {
                    assert!(n.op.is_elementwise(), "invariant: {:?} is stored before a pass reads it", n.op);
                    (What::Map(n.op), n.args.to_vec())
                }
                Source::Same(other) => (What::Copy, vec![other]),
            };
            stack.extend(args.iter().copied());
            how.insert(id, (what, args));
        }
        let order: Vec<NodeId> = (0..g.len() as u32).map(NodeId).filter(|id| need[id.0 as usize]).collect();
        let mut last_use: HashMap<NodeId, usize> = HashMap::new();
        for (i, id) in order.iter().enumerate() {
            for a in &how[id].1 {
                last_use.insert(*a, i);
            }
        }
        for r in roots {
            last_use.insert(*r, usize::MAX);
        }
        let (mut slot_of, mut free, mut slots) = (HashMap::new(), Vec::new(), 0usize);
        let mut steps = Vec::new();
        for (i, &id) in order.iter().enumerate() {
            let (what, ref reads) = how[&id];
            let out = free.pop().unwrap_or_else(|| {
                slots += 1;
                slots - 1
            });
            let mut args = [usize::MAX; 3];
            for (k, a) in reads.iter().enumerate() {
                args[k] = slot_of[a];
            }
            steps.push(Step { what, args, out });
            slot_of.insert(id, out);
            // Free the slots of arguments whose last use this was (after taking `out`).
            for a in reads {
                if last_use.get(a) == Some(&i) && !free.contains(&slot_of[a]) {
                    free.push(slot_of[a]);
                }
            }
        }
        let outputs = roots.iter().map(|r| slot_of[r]).collect();
        Program { steps, slots, outputs }
    }

    /// Whether a node takes another's value (`Source::Same`): gathers and scatters at
    /// their sort's positions, which read element-order values at the elements.
    pub fn aliases(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.what, What::Copy))
    }

    /// Fresh slots for `run` (one set per worker thread).
    pub fn slots(&self) -> Vec<Vec<f64>> {
        (0..self.slots).map(|_| Vec::with_capacity(CHUNK)).collect()
    }

    /// Evaluates every step on the chunk `at`.
    pub fn run(&self, src: &Sources, at: &At, slots: &mut [Vec<f64>]) {
        for step in &self.steps {
            let mut out = std::mem::take(&mut slots[step.out]);
            out.clear();
            match step.what {
                What::Read(r) => read(src, r, at, &mut out),
                What::Copy => out.extend_from_slice(&slots[step.args[0]]),
                What::Map(op) => {
                    let arg = |k: usize| -> &[f64] { &slots[step.args[k]] };
                    match op.arity() {
                        1 => map1(op, arg(0), &mut out),
                        2 => map2(op, arg(0), arg(1), &mut out),
                        _ => map3(op, arg(0), arg(1), arg(2), &mut out),
                    }
                }
            }
            slots[step.out] = out;
        }
    }
}

/// Reads a stored value at the chunk.
fn read(src: &Sources, r: Read, at: &At, out: &mut Vec<f64>) {
    let ext = src.ext;
    match r {
        Read::Input(i) => {
            if let Some((_, vals)) = at.carried.iter().find(|(j, _)| *j == i) {
                out.extend(vals.iter().map(|&v| f64::from(v)));
                return;
            }
            let v = &src.inputs[i];
            read_elements(v.shape, ext, &at.elements, out, |o| f64::from(v.data[o]));
        }
        Read::Tensor(id) => {
            let t = &src.tensors[&id];
            read_elements(t.shape, ext, &at.elements, out, |o| t.data[o]);
        }
        Read::Scattered(id) => {
            let Scattered { buf, stride, offset } = &src.scattered[&id];
            let get = |o: usize| buf[o * stride + offset];
            read_elements(ext, ext, &at.elements, out, get);
        }
        Read::ClassIndex => read_elements([1, ext[1], 1], ext, &at.elements, out, |o| o as f64),
        Read::Column(id) => {
            let c = &src.columns[&id];
            let part = &c.data[at.q0..at.q0 + at.len];
            match &c.carry {
                Some(carry) => {
                    let k = carry[at.segment];
                    out.extend(part.iter().map(|v| k + v));
                }
                None => out.extend_from_slice(part),
            }
        }
    }
}

/// Reads a value stored with `shape` (each axis 1, broadcast, or the extent) at
/// element positions; a value constant along a one-row range is read once.
pub fn read_elements(shape: [usize; 3], ext: [usize; 3], loc: &Loc, out: &mut Vec<f64>, get: impl Fn(usize) -> f64) {
    if shape == [1, 1, 1] {
        out.push(get(0));
        return;
    }
    let st = [
        if shape[0] > 1 { shape[1] * shape[2] } else { 0 },
        if shape[1] > 1 { shape[2] } else { 0 },
        usize::from(shape[2] > 1),
    ];
    let [_, cn, sn] = ext;
    let offset = |i: usize| (i / (cn * sn)) * st[0] + ((i / sn) % cn) * st[1] + (i % sn) * st[2];
    match *loc {
        Loc::Range { start, len } if shape == ext => out.extend((start..start + len).map(get)),
        Loc::Range { start, len } if start % sn + len <= sn => {
            // One row: contiguous, or constant along it.
            let base = offset(start);
            if st[2] == 0 {
                out.push(get(base));
            } else {
                out.extend((base..base + len).map(get));
            }
        }
        Loc::Range { start, len } => out.extend((start..start + len).map(|i| get(offset(i)))),
        Loc::List(idx) if shape == ext => out.extend(idx.iter().map(|&i| get(i))),
        Loc::List(idx) => out.extend(idx.iter().map(|&i| get(offset(i)))),
    }
}

/// Applies a scalar function over slots that each hold one value or `n`.
fn apply1(a: &[f64], out: &mut Vec<f64>, f: impl Fn(f64) -> f64) {
    out.extend(a.iter().map(|&x| f(x)));
}

fn apply2(a: &[f64], b: &[f64], out: &mut Vec<f64>, f: impl Fn(f64, f64) -> f64) {
    match (a.len(), b.len()) {
        (1, _) => out.extend(b.iter().map(|&y| f(a[0], y))),
        (_, 1) => out.extend(a.iter().map(|&x| f(x, b[0]))),
        _ => out.extend(a.iter().zip(b).map(|(&x, &y)| f(x, y))),
    }
}

fn map1(op: Op, a: &[f64], out: &mut Vec<f64>) {
    match op {
        Op::Neg => apply1(a, out, |x| -x),
        Op::Abs => apply1(a, out, f64::abs),
        Op::Exp => apply1(a, out, f64::exp),
        Op::Log => apply1(a, out, f64::ln),
        Op::Sqrt => apply1(a, out, f64::sqrt),
        Op::Relu => apply1(a, out, |x| if x > 0.0 || x.is_nan() { x } else { 0.0 }),
        _ => apply1(a, out, |x| op.apply(&[x]).expect("invariant: elementwise op")),
    }
}

fn map2(op: Op, a: &[f64], b: &[f64], out: &mut Vec<f64>) {
    let bit = |c: bool| if c { 1.0 } else { 0.0 };
    match op {
        Op::Add => apply2(a, b, out, |x, y| x + y),
        Op::Sub => apply2(a, b, out, |x, y| x - y),
        Op::Mul => apply2(a, b, out, |x, y| x * y),
        Op::Div => apply2(a, b, out, |x, y| x / y),
        Op::Lt => apply2(a, b, out, |x, y| bit(x < y)),
        Op::Le => apply2(a, b, out, |x, y| bit(x <= y)),
        Op::Gt => apply2(a, b, out, |x, y| bit(x > y)),
        Op::Ge => apply2(a, b, out, |x, y| bit(x >= y)),
        Op::Eq => apply2(a, b, out, |x, y| bit(x == y)),
        Op::Ne => apply2(a, b, out, |x, y| bit(x != y)),
        _ => apply2(a, b, out, |x, y| op.apply(&[x, y]).expect("invariant: elementwise op")),
    }
}

fn map3(op: Op, a: &[f64], b: &[f64], c: &[f64], out: &mut Vec<f64>) {
    let n = a.len().max(b.len()).max(c.len());
    let at = |s: &[f64], i: usize| if s.len() == 1 { s[0] } else { s[i] };
    match op {
        Op::Select => out.extend((0..n).map(|i| if at(a, i) != 0.0 { at(b, i) } else { at(c, i) })),
        _ => out.extend((0..n).map(|i| op.apply(&[at(a, i), at(b, i), at(c, i)]).expect("invariant: elementwise op"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_broadcast_and_stay_scalar_along_a_constant_row() {
        let ext = [2, 3, 4];
        let data: Vec<f64> = (0..6).map(f64::from).collect(); // shape [2, 3, 1]
        let mut out = Vec::new();
        read_elements([2, 3, 1], ext, &Loc::Range { start: 4, len: 4 }, &mut out, |o| data[o]);
        assert_eq!(out, vec![1.0]);
        out.clear();
        read_elements([2, 3, 1], ext, &Loc::Range { start: 2, len: 4 }, &mut out, |o| data[o]);
        assert_eq!(out, vec![0.0, 0.0, 1.0, 1.0]);
        out.clear();
        read_elements([1, 1, 4], ext, &Loc::List(&[23, 0, 5]), &mut out, |o| o as f64);
        assert_eq!(out, vec![3.0, 0.0, 1.0]);
    }
}
