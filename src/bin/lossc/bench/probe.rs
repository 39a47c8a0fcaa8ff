//! What a loss's plan must move, and the yardsticks it is measured against:
//! a memory-bandwidth probe that streams the same arrays in the same sweeps,
//! and a parallel sort of as many (key, index) pairs as a sorting loss sorts.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lossc::ir::{AxisSet, Op};
use lossc::schedule::{crosses_elements, inputs_read, levels};
use lossc::Loss;
use rayon::prelude::*;

/// One pass over the elements, as far as memory traffic goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    /// Inputs streamed, by index.
    pub reads: BTreeSet<usize>,
    /// Whether it writes the gradient of the first input.
    pub writes_first: bool,
}

/// The sweeps of `loss` computing its value and the gradient of the first input only:
/// what a trainer asks for, and so what `lossc bench` times. `schedule::schedule` plans
/// every gradient; a gradient nobody asked for may add reads that are never made.
pub fn traffic(loss: &Loss) -> Vec<Traffic> {
    let g = loss.graph();
    let first = loss.gradient_nodes().first().copied().flatten();
    let mut roots = vec![loss.root()];
    roots.extend(first);
    let level = levels(g, &roots);
    let count = first.map(|n| level[&n] + 1).into_iter().chain([level[&loss.root()]]).max().unwrap_or(0).max(1);
    let mut sweeps = vec![Traffic { reads: BTreeSet::new(), writes_first: false }; count];
    for id in g.reachable(&roots) {
        if crosses_elements(g, id) {
            let k = level[&id] - 1;
            sweeps[k].reads.extend(inputs_read(g, &g.node(id).args, &level, k));
        }
    }
    if let Some(n) = first {
        let k = level[&n];
        sweeps[k].writes_first = true;
        sweeps[k].reads.extend(inputs_read(g, &[n], &level, k));
    }
    sweeps
}

/// Bytes the sweeps move as float32: each streamed input once per sweep that reads it,
/// the first input's gradient once. `lens` are the inputs' element counts.
pub fn bytes(sweeps: &[Traffic], lens: &[usize]) -> usize {
    sweeps
        .iter()
        .map(|s| 4 * (s.reads.iter().map(|&i| lens[i]).sum::<usize>() + usize::from(s.writes_first) * lens[0]))
        .sum()
}

/// Whether a loss is multiclass by nature: some value in it varies over classes but not
/// over space (a per-class statistic or a class weight), or is reduced over the class axis
/// alone (softmax, log-softmax). Such a loss is benchmarked on 5 classes, not 1.
pub fn multiclass(loss: &Loss) -> bool {
    let g = loss.graph();
    let mut roots = vec![loss.root()];
    roots.extend(loss.gradient_nodes().iter().flatten());
    g.reachable(&roots).iter().any(|&id| {
        let axes = g.axes(id);
        let per_class = axes.contains(AxisSet::CLASS) && !axes.contains(AxisSet::SPATIAL);
        let over_class = matches!(g.node(id).op, Op::Sum(a) | Op::LogSumExp(a) if a == AxisSet::CLASS);
        per_class || over_class
    })
}

/// Elements per probe block. Fixed, like the runtime's blocks, so the work per task does
/// not change with the thread count; 16K floats per array keep a block's arrays in L2.
const BLOCK: usize = 1 << 14;

/// One probe sweep: reads every array in `reads` (summing it, so the reads cannot be
/// skipped) and, if given, writes `out` (with the elementwise sum of the reads of its
/// length), in parallel over fixed blocks. Arrays of different lengths (a broadcast
/// input) are split into the same number of blocks, proportionally.
pub fn sweep(reads: &[&[f32]], out: Option<&mut [f32]>) -> f32 {
    let longest = reads.iter().map(|r| r.len()).chain(out.as_ref().map(|o| o.len())).max().unwrap_or(0);
    let blocks = longest.div_ceil(BLOCK).max(1);
    let part = |r: &'_ [f32], b: usize| -> std::ops::Range<usize> { b * r.len() / blocks..(b + 1) * r.len() / blocks };
    match out {
        Some(out) => {
            // Cut `out` into the blocks up front, so each task owns its piece.
            let mut pieces = Vec::with_capacity(blocks);
            let mut rest = out;
            let total = rest.len();
            for b in 0..blocks {
                let len = (b + 1) * total / blocks - b * total / blocks;
                let (head, tail) = rest.split_at_mut(len);
                pieces.push(head);
                rest = tail;
            }
            pieces
                .into_par_iter()
                .enumerate()
                .map(|(b, piece)| {
                    let parts: Vec<&[f32]> = reads.iter().map(|r| &r[part(r, b)]).collect();
                    block_write(&parts, piece)
                })
                .sum()
        }
        None => (0..blocks).into_par_iter().map(|b| reads.iter().map(|r| sum(&r[part(r, b)])).sum::<f32>()).sum(),
    }
}

/// Writes the elementwise sum of the reads as long as `out` into `out`; sums the others.
fn block_write(reads: &[&[f32]], out: &mut [f32]) -> f32 {
    let (same, other): (Vec<&[f32]>, Vec<&[f32]>) = reads.iter().partition(|r| r.len() == out.len());
    let rest: f32 = other.iter().map(|r| sum(r)).sum();
    rest + match same.as_slice() {
        [] => {
            out.fill(0.0);
            0.0
        }
        [a] => {
            out.copy_from_slice(a);
            sum(out)
        }
        [a, b] => add2(a, b, out),
        [a, b, more @ ..] => {
            // Rare (three full-size streamed inputs): the extra passes stay in cache.
            add2(a, b, out);
            for m in more {
                out.iter_mut().zip(m.iter()).for_each(|(o, v)| *o += v);
            }
            sum(out)
        }
    }
}

/// `out = a + b`, returning the sum of `out`; eight lanes so that it vectorises.
fn add2(a: &[f32], b: &[f32], out: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut oc = out.chunks_exact_mut(8);
    let (mut ac, mut bc) = (a.chunks_exact(8), b.chunks_exact(8));
    for ((o, x), y) in (&mut oc).zip(&mut ac).zip(&mut bc) {
        for k in 0..8 {
            let v = x[k] + y[k];
            o[k] = v;
            acc[k] += v;
        }
    }
    let mut tail = 0.0;
    for ((o, x), y) in oc.into_remainder().iter_mut().zip(ac.remainder()).zip(bc.remainder()) {
        *o = x + y;
        tail += *o;
    }
    acc.iter().sum::<f32>() + tail
}

/// The sum of `r` with eight accumulators (one would serialise on the add latency).
fn sum(r: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = r.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Times every probe sweep of a plan once, back to back: the probe's forward+backward.
pub fn run_plan(sweeps: &[Traffic], inputs: &[&[f32]], grad: &mut [f32]) -> (Duration, f32) {
    let start = Instant::now();
    let mut check = 0.0;
    for s in sweeps {
        let reads: Vec<&[f32]> = s.reads.iter().map(|&i| inputs[i]).collect();
        check += sweep(&reads, if s.writes_first { Some(&mut *grad) } else { None });
    }
    (start.elapsed(), std::hint::black_box(check))
}

/// A parallel sort of (key, index) pairs, descending by key as Lovász sorts its errors.
pub struct SortProbe {
    keys: Vec<(f32, u32)>,
    work: Vec<(f32, u32)>,
}

impl SortProbe {
    pub fn new(values: &[f32]) -> SortProbe {
        let keys: Vec<(f32, u32)> = values.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
        // Touch the work buffer now, so that no run pays its page faults.
        let work = keys.clone();
        SortProbe { keys, work }
    }

    /// Sorts a fresh copy of the keys; only the sort is timed.
    pub fn run(&mut self) -> Duration {
        self.work.copy_from_slice(&self.keys);
        let start = Instant::now();
        self.work.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let elapsed = start.elapsed();
        std::hint::black_box(&self.work);
        elapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str) -> Vec<(Vec<usize>, bool)> {
        let loss = Loss::compile(name, "").expect("compiles");
        traffic(&loss).into_iter().map(|t| (t.reads.into_iter().collect(), t.writes_first)).collect()
    }

    #[test]
    fn plans_count_what_the_first_gradient_needs() {
        // d dice / dp needs only y and the sums: the gradient sweep does not read p.
        assert_eq!(plan("dice"), vec![(vec![0, 1], false), (vec![1], true)]);
        assert_eq!(plan("bce_logits"), vec![(vec![0, 1], true)]);
        assert_eq!(bytes(&traffic(&Loss::compile("dice", "").expect("compiles")), &[10, 10]), 4 * 40);
    }

    #[test]
    fn multiclass_by_nature() {
        for (name, want) in
            [("dice", false), ("dice_per_image", false), ("bce_logits", false), ("dice_multiclass", true)]
        {
            assert_eq!(multiclass(&Loss::compile(name, "").expect("compiles")), want, "{name}");
        }
        assert!(multiclass(&Loss::compile("cross_entropy", "").expect("compiles")));
        assert!(multiclass(&Loss::compile("dice_multiclass_weighted", "").expect("compiles")));
    }

    #[test]
    fn probe_sweeps_read_and_write_everything() {
        let a: Vec<f32> = (0..100_003).map(|i| (i % 7) as f32).collect();
        let b: Vec<f32> = vec![1.0; a.len()];
        let small = vec![2.0f32; 5];
        let mut out = vec![0.0f32; a.len()];
        let want: f32 = a.iter().sum::<f32>() + b.len() as f32;
        assert_eq!(sweep(&[&a, &b], None), want);
        let got = sweep(&[&a, &b, &small], Some(&mut out));
        assert_eq!(got, want + 10.0);
        assert!(out.iter().zip(&a).all(|(o, x)| *o == x + 1.0));
    }
}
