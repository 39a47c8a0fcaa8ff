//! A sort's permutation: made by a radix sort that carries the inputs later passes
//! gather, and undone by a scatter that moves values in two cache-friendly passes.
//!
//! Reading or writing through a permutation of millions of elements is a random
//! access per element; here each costs 50-90 ns (TLB misses, even with huge pages
//! on this VM), far more than a pass over memory. So neither the gather nor the
//! scatter is done that way:
//! - The inputs a gather of this sort reads (full-size f32 inputs, the common case:
//!   Lovász gathers the labels and the errors computed from the logits) ride in the
//!   sort's records next to the key and the element index, and a gather reads them
//!   in sorted order. Anything else a gather reads (small tensors, the class index)
//!   is read at the element indices, which is cheap; a large computed value would
//!   be read at random (correct, only slow).
//! - A scatter first moves (element index, values) pairs into buckets of nearby
//!   element indices (a radix pass on the index's top bits, which writes a few
//!   dozen sequential streams), then writes each bucket into its own range of the
//!   output, which fits in cache. Staged f64 values move as (u64, f64...) records
//!   (`unsort`); a gradient computed in sorted order moves as (u32, f32) records,
//!   straight into the caller's buffer (`put_back`).
//!
//! Each destination is written exactly once, so the result does not depend on how
//! the work is split across threads.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::ir::{NodeId, Op};

use super::layout::{Layout, Segment};
use super::passes::{at, Cx, Store};
use super::pool;
use super::radix::{self, Wide};
use super::vm::{At, Loc, Program};

/// At most this many inputs ride in a sort's records (4 + 4 * this bytes each).
pub const MAX_CARRIED: usize = 4;

/// Bytes of output a bucket of `unsort` covers, at most.
const BUCKET_BYTES: usize = 4 << 20;

/// Fewer positions than this are scattered by one thread.
const MIN_BLOCK: usize = 1 << 16;

/// A sort's permutation: for each sorted position, the element's index (and key).
pub enum Perm {
    /// Records of `width` u32s: the key's ordered bits, the element index, then the
    /// f32 bits of each input in `carried` at that element.
    Narrow {
        data: Vec<u32>,
        width: usize,
        carried: Vec<usize>,
    },
    /// For more than 2^32 elements: key and index only.
    Wide(Vec<Wide>),
    Released,
}

impl Perm {
    /// The element indices at sorted positions `q0..q0 + len`, into `out`.
    pub fn indices(&self, q0: usize, len: usize, out: &mut Vec<usize>) {
        out.clear();
        match self {
            Perm::Narrow { data, width: w, .. } => {
                out.extend(data[q0 * w..(q0 + len) * w].chunks_exact(*w).map(|r| r[1] as usize))
            }
            Perm::Wide(p) => out.extend(p[q0..q0 + len].iter().map(|e| e.index as usize)),
            Perm::Released => panic!("invariant: a permutation is read before its release"),
        }
    }

    /// The carried inputs at sorted positions `q0..q0 + len`, as `At::carried` takes them.
    pub fn carried(&self, q0: usize, len: usize, out: &mut Vec<(usize, Vec<f32>)>) {
        let Perm::Narrow { data, width: w, carried } = self else {
            out.clear();
            return;
        };
        out.resize_with(carried.len(), Default::default);
        let records = &data[q0 * w..(q0 + len) * w];
        for (j, (slot, &input)) in out.iter_mut().zip(carried).enumerate() {
            slot.0 = input;
            slot.1.clear();
            slot.1.extend(records.chunks_exact(*w).map(|r| f32::from_bits(r[2 + j])));
        }
    }

    /// The element index of each sorted position, as a function (for `Buckets`).
    fn index_fn(&self) -> impl Fn(usize) -> usize + Sync + '_ {
        move |q| match self {
            Perm::Narrow { data, width, .. } => data[q * width + 1] as usize,
            Perm::Wide(p) => p[q].index as usize,
            Perm::Released => panic!("invariant: a permutation is read before its release"),
        }
    }

    /// Gives the buffer back to the pool.
    pub fn release(&mut self) {
        match std::mem::replace(self, Perm::Released) {
            Perm::Narrow { data, .. } => pool::give(data),
            Perm::Wide(p) => pool::give(p),
            Perm::Released => {}
        }
    }
}

pub struct Sorted {
    pub layout: Layout,
    pub perm: Perm,
}

/// Computes the key, sorts each group, and keeps the permutation.
pub fn sort(cx: &Cx, store: &Store, id: NodeId) -> Sorted {
    let n = cx.g.node(id);
    let Op::Sort { group, descending } = n.op else { panic!("invariant: a sort node") };
    let layout = Layout::new(cx.ext, group);
    let prog = cx.program(&[n.args[0]]);
    let perm = if layout.len() <= 1 << 32 {
        let carried = carried_inputs(cx, id);
        let width = 2 + carried.len();
        let mut data = pool::take::<u32>(layout.len() * width);
        fill(cx, store, &prog, &layout, &mut data, width, |rec, key, i| {
            rec[0] = radix::ordered_bits(key, descending);
            rec[1] = i as u32;
            for (r, &input) in rec[2..].iter_mut().zip(&carried) {
                *r = cx.inputs[input].data[i].to_bits();
            }
        });
        let mut scratch = pool::take::<u32>(data.len());
        let group = layout.size * width;
        data.par_chunks_mut(group).zip(scratch.par_chunks_mut(group)).for_each(|(d, s)| sort_records(d, s, width));
        pool::give(scratch);
        Perm::Narrow { data, width, carried }
    } else {
        let mut data = pool::take::<Wide>(layout.len());
        fill(cx, store, &prog, &layout, &mut data, 1, |rec, key, i| {
            rec[0] = Wide { key: radix::ordered_bits(key, descending), index: i as u64 }
        });
        let mut scratch = pool::take::<Wide>(data.len());
        let group = layout.size;
        data.par_chunks_mut(group).zip(scratch.par_chunks_mut(group)).for_each(|(d, s)| radix::sort(d, s));
        pool::give(scratch);
        Perm::Wide(data)
    };
    Sorted { layout, perm }
}

/// The large f32 inputs that gathers along sort `id` read (through elementwise nodes),
/// in input order, at most `MAX_CARRIED`.
fn carried_inputs(cx: &Cx, id: NodeId) -> Vec<usize> {
    let gathered: Vec<NodeId> = cx
        .kind
        .iter()
        .filter(|(&n, _)| cx.g.node(n).op == Op::Gather && cx.g.node(n).args[0] == id)
        .map(|(&n, _)| cx.g.node(n).args[1])
        .collect();
    let read: BTreeSet<usize> = super::frontier(cx.g, cx.kind, &gathered)
        .into_iter()
        .filter_map(|n| match cx.g.node(n).op {
            Op::Input { index, .. } if cx.inputs[index as usize].shape == cx.ext => Some(index as usize),
            _ => None,
        })
        .collect();
    read.into_iter().take(MAX_CARRIED).collect()
}

/// Fills `width` values of `T` per sorted-layout position, in element order within
/// each group: `make(record, key, element index)`.
fn fill<T: Send>(
    cx: &Cx,
    store: &Store,
    prog: &Program,
    layout: &Layout,
    data: &mut [T],
    width: usize,
    make: impl Fn(&mut [T], f32, usize) + Sync,
) {
    let src = store.sources(cx);
    let pieces = split(data, &layout.segments, width);
    pieces.into_par_iter().zip(layout.segments.par_iter().enumerate()).for_each_init(
        || (prog.slots(), Vec::new()),
        |(slots, idx), (out, (si, seg))| {
            let loc = if layout.unsorted_elements(seg, idx) {
                Loc::Range { start: layout.element(seg.group, seg.q0 - seg.group * layout.size), len: seg.len }
            } else {
                Loc::List(idx)
            };
            let at_chunk = At { elements: loc, q0: seg.q0, len: seg.len, segment: si, carried: &[] };
            prog.run(&src, &at_chunk, slots);
            let key = &slots[prog.outputs[0]];
            for (k, rec) in out.chunks_exact_mut(width).enumerate() {
                // Rounding to f32 keeps the order (ties it may create keep element order).
                make(rec, at(key, k) as f32, loc.get(k));
            }
        },
    );
}

/// Sorts records of `width` u32s (2 to 2 + `MAX_CARRIED`) by their first.
fn sort_records(data: &mut [u32], scratch: &mut [u32], width: usize) {
    fn by<const W: usize>(data: &mut [u32], scratch: &mut [u32]) {
        let (d, s) = (data.as_chunks_mut::<W>().0, scratch.as_chunks_mut::<W>().0);
        radix::sort(d, s);
    }
    match width {
        2 => by::<2>(data, scratch),
        3 => by::<3>(data, scratch),
        4 => by::<4>(data, scratch),
        5 => by::<5>(data, scratch),
        6 => by::<6>(data, scratch),
        w => unreachable!("records of {w} words: at most {MAX_CARRIED} inputs are carried"),
    }
}

/// Cuts `rest` into consecutive pieces of `width` times the segments' lengths.
pub fn split<'b, T>(mut rest: &'b mut [T], segments: &[Segment], width: usize) -> Vec<&'b mut [T]> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(s.len * width);
        out.push(head);
        rest = tail;
    }
    out
}

/// Element order from sorted order: `out[perm[q] * stride + j] = staged[q * stride + j]`.
pub fn unsort(perm: &Perm, staged: &[f64], stride: usize) -> Vec<f64> {
    let n = staged.len() / stride;
    let mut out = pool::take::<f64>(n * stride);
    let index = perm.index_fn();
    let plan = Buckets::new(n, 8 * stride, &index);
    // Up to three values travel per record; more go in several rounds.
    for col in (0..stride).step_by(3) {
        match (stride - col).min(3) {
            1 => unsort_round::<2>(&plan, staged, stride, col, &index, &mut out),
            2 => unsort_round::<3>(&plan, staged, stride, col, &index, &mut out),
            _ => unsort_round::<4>(&plan, staged, stride, col, &index, &mut out),
        }
    }
    out
}

/// One round of `unsort`: values `col..col + W - 1` of each row, as records
/// `[element index, values...]`.
fn unsort_round<const W: usize>(
    plan: &Buckets,
    staged: &[f64],
    stride: usize,
    col: usize,
    index: &(impl Fn(usize) -> usize + Sync),
    out: &mut [f64],
) {
    let make = |q: usize| -> [u64; W] {
        let mut r = [0u64; W];
        r[0] = index(q) as u64;
        for (j, v) in r[1..].iter_mut().enumerate() {
            *v = staged[q * stride + col + j].to_bits();
        }
        r
    };
    plan.unsort(make, out, stride, |row, r| {
        for (j, v) in r[1..].iter().enumerate() {
            row[col + j] = f64::from_bits(*v);
        }
    });
}

/// Puts f32 values in sorted order back in element order, into `outs[j]` from
/// `staged[j]`: `outs[j][perm[q]] = staged[j][q]`. Records are half the size of
/// `unsort`'s (an index and one f32) for a permutation of fewer than 2^32 elements.
pub fn put_back(perm: &Perm, staged: &[&[f32]], outs: &mut [&mut [f32]]) {
    let Some(n) = staged.first().map(|s| s.len()) else { return };
    let index = perm.index_fn();
    let plan = Buckets::new(n, 4, &index);
    for (values, out) in staged.iter().zip(outs.iter_mut()) {
        // A narrow permutation's indices fit in 32 bits.
        if matches!(perm, Perm::Narrow { .. }) {
            let make = |q: usize| [index(q) as u32, values[q].to_bits()];
            plan.unsort(make, out, 1, |row, r: &[u32]| row[0] = f32::from_bits(r[1]));
        } else {
            let make = |q: usize| [index(q) as u64, u64::from(values[q].to_bits())];
            plan.unsort(make, out, 1, |row, r: &[u64]| row[0] = f32::from_bits(r[1] as u32));
        }
    }
}

/// A word of a record moved by `Buckets::unsort`: the first of each holds an element index.
trait Word: Copy + Default + Send + Sync + pool::Pooled {
    fn index(self) -> usize;
}

impl Word for u32 {
    fn index(self) -> usize {
        self as usize
    }
}

impl Word for u64 {
    fn index(self) -> usize {
        self as usize
    }
}

/// How values move from sorted order to element order: blocks of sorted positions,
/// buckets of nearby elements.
struct Buckets {
    shift: u32,
    blocks: Vec<(usize, usize)>,
    /// Per block, how many of its positions go to each bucket.
    counts: Vec<Vec<usize>>,
    /// Where each bucket's records start.
    starts: Vec<usize>,
}

impl Buckets {
    /// The plan for `n` positions whose element indices `index` gives, for an output of
    /// `bytes` per element.
    fn new(n: usize, bytes: usize, index: &(impl Fn(usize) -> usize + Sync)) -> Buckets {
        // Buckets of 2^shift consecutive elements: few, since each is a stream of records
        // in the first pass and fewer streams write faster (measured: 16 buckets took 0.65
        // of the time of 256), but each bucket's range of the output (`BUCKET_BYTES`)
        // should stay in the last-level cache for the second pass's random writes. At most
        // 256 buckets, and offsets within a bucket fit in 32 bits.
        let bits = usize::BITS - n.saturating_sub(1).leading_zeros();
        let span = (BUCKET_BYTES / bytes).max(1).ilog2();
        let shift = span.max(bits.saturating_sub(8)).min(32);
        let buckets = n.div_ceil(1 << shift);
        let block = n.div_ceil(rayon::current_num_threads().max(1)).max(MIN_BLOCK);
        let blocks: Vec<(usize, usize)> = (0..n).step_by(block).map(|q0| (q0, block.min(n - q0))).collect();
        let counts: Vec<Vec<usize>> = blocks
            .par_iter()
            .map(|&(q0, len)| {
                let mut c = vec![0usize; buckets];
                for q in q0..q0 + len {
                    c[index(q) >> shift] += 1;
                }
                c
            })
            .collect();
        let mut starts = vec![0usize; buckets + 1];
        for b in 0..buckets {
            starts[b + 1] = starts[b] + counts.iter().map(|c| c[b]).sum::<usize>();
        }
        Buckets { shift, blocks, counts, starts }
    }

    /// Moves one record per sorted position (`make(q)`, whose first word is the element
    /// index) to its bucket, in (bucket, block) order; then each bucket's records into
    /// its range of `out` (rows of `stride` values): `put(row, record)`.
    fn unsort<T: Word, const W: usize, O: Send>(
        &self,
        make: impl Fn(usize) -> [T; W] + Sync,
        out: &mut [O],
        stride: usize,
        put: impl Fn(&mut [O], &[T]) + Sync,
    ) {
        let shift = self.shift;
        let n = self.starts.last().copied().unwrap_or(0);
        let mut words = pool::take::<T>(n * W);
        let records = words.as_chunks_mut::<W>().0;
        let mut slices: Vec<Vec<&mut [[T; W]]>> = self.blocks.iter().map(|_| Vec::with_capacity(256)).collect();
        let mut rest = &mut records[..];
        for b in 0..self.starts.len() - 1 {
            for (k, c) in self.counts.iter().enumerate() {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(c[b]);
                slices[k].push(head);
                rest = tail;
            }
        }
        for s in &mut slices {
            s.resize_with(256, Default::default);
        }
        slices.into_par_iter().zip(&self.blocks).for_each(|(out, &(q0, len))| {
            let out: [&mut [[T; W]]; 256] = out.try_into().unwrap_or_else(|_| unreachable!("256 buckets"));
            radix::scatter((q0..q0 + len).map(&make), out, |r| r[0].index() >> shift);
        });
        let records = &words.as_chunks::<W>().0;
        out.par_chunks_mut(stride << shift).enumerate().for_each(|(b, dst)| {
            let base = b << shift;
            for r in &records[self.starts[b]..self.starts[b + 1]] {
                let i = r[0].index() - base;
                put(&mut dst[i * stride..(i + 1) * stride], r);
            }
        });
        pool::give(words);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsort_inverts_the_permutation() {
        for n in [0usize, 1, 5, 70_001, 300_000, 1_100_000] {
            let mut idx: Vec<usize> = (0..n).collect();
            let mut s = 12345u64;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (s >> 33) as usize % (i + 1));
            }
            let data: Vec<u32> = idx.iter().flat_map(|&i| [0, i as u32]).collect();
            let perm = Perm::Narrow { data, width: 2, carried: vec![] };
            let staged: Vec<f64> = (0..n).flat_map(|q| [q as f64, -(q as f64)]).collect();
            let out = unsort(&perm, &staged, 2);
            for (q, &i) in idx.iter().enumerate() {
                assert_eq!((out[2 * i], out[2 * i + 1]), (q as f64, -(q as f64)));
            }
            // f32 values into two buffers, through 32-bit and 64-bit indices.
            let wide = Perm::Wide(idx.iter().map(|&i| Wide { key: 0, index: i as u64 }).collect());
            let (a, b): (Vec<f32>, Vec<f32>) = (0..n).map(|q| (q as f32 + 0.5, -(q as f32))).unzip();
            for p in [&perm, &wide] {
                let (mut oa, mut ob) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                put_back(p, &[&a, &b], &mut [&mut oa, &mut ob]);
                assert!(idx.iter().enumerate().all(|(q, &i)| oa[i] == a[q] && ob[i] == b[q]));
            }
        }
    }
}
