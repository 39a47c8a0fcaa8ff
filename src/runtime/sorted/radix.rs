//! A stable LSD radix sort of (key, element index) entries by a 32-bit key, in parallel.
//!
//! Stability is what the `Sort` op needs (ties keep element order), and it makes the
//! result unique: the output does not depend on how the work was split across threads.
//! Each pass sorts by one byte of the key; the input is cut into blocks, each block
//! counts its bytes, and the output is cut (safely, with `split_at_mut`) into one
//! slice per (byte value, block) so that blocks scatter in parallel without sharing.

use rayon::prelude::*;

/// Fewer entries than this are sorted by one thread.
const MIN_BLOCK: usize = 1 << 16;

/// An entry of a sort: the order-preserving bits of the key and the element it stands for.
pub trait Entry: Copy + Send + Sync + Default + 'static {
    fn new(key: u32, index: usize) -> Self;
    fn key(self) -> u32;
    fn index(self) -> usize;
}

/// Key and a 32-bit index packed in one word (tensors of up to 2^32 elements).
impl Entry for u64 {
    fn new(key: u32, index: usize) -> Self {
        debug_assert!(index <= u32::MAX as usize);
        (u64::from(key) << 32) | index as u64
    }
    fn key(self) -> u32 {
        (self >> 32) as u32
    }
    fn index(self) -> usize {
        (self & 0xffff_ffff) as usize
    }
}

/// Key and a 64-bit index, for tensors beyond 2^32 elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wide {
    key: u32,
    index: u64,
}

impl Entry for Wide {
    fn new(key: u32, index: usize) -> Self {
        Wide { key, index: index as u64 }
    }
    fn key(self) -> u32 {
        self.key
    }
    fn index(self) -> usize {
        self.index as usize
    }
}

/// The bits of `x` as an unsigned number in the order of `f32::total_cmp`
/// (-NaN < -inf < ... < -0 < +0 < ... < inf < NaN); reversed for a descending sort.
pub fn ordered_bits(x: f32, descending: bool) -> u32 {
    let b = x.to_bits();
    let up = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    if descending {
        !up
    } else {
        up
    }
}

/// Sorts `data` by key, stably; `scratch` (at least as long) is clobbered.
pub fn sort<E: Entry>(data: &mut [E], scratch: &mut [E]) {
    let n = data.len();
    let scratch = &mut scratch[..n];
    // Blocks only split the work; a stable sort's result is the same for any split.
    let block = n.div_ceil(rayon::current_num_threads().max(1)).max(MIN_BLOCK);
    let mut in_data = true;
    for shift in [0u32, 8, 16, 24] {
        let (src, dst): (&[E], &mut [E]) = if in_data { (&*data, &mut *scratch) } else { (&*scratch, &mut *data) };
        if pass(src, dst, shift, block) {
            in_data = !in_data;
        }
    }
    if !in_data {
        data.par_chunks_mut(MIN_BLOCK).zip(scratch.par_chunks(MIN_BLOCK)).for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// One counting pass on the byte at `shift`; false (and nothing written) if every
/// key has the same byte there.
fn pass<E: Entry>(src: &[E], dst: &mut [E], shift: u32, block: usize) -> bool {
    let digit = |e: E| ((e.key() >> shift) & 0xff) as usize;
    let counts: Vec<[usize; 256]> = src
        .par_chunks(block)
        .map(|chunk| {
            let mut c = [0usize; 256];
            for &e in chunk {
                c[digit(e)] += 1;
            }
            c
        })
        .collect();
    let n = src.len();
    if (0..256).any(|d| counts.iter().map(|c| c[d]).sum::<usize>() == n) {
        return false;
    }
    // Output slices in (digit, block) order: block b's entries with digit d go after
    // every entry with a smaller digit and after earlier blocks' entries with digit d.
    let mut slices: Vec<Vec<&mut [E]>> = counts.iter().map(|_| Vec::with_capacity(256)).collect();
    let mut rest = dst;
    for d in 0..256 {
        for (b, c) in counts.iter().enumerate() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(c[d]);
            slices[b].push(head);
            rest = tail;
        }
    }
    slices.into_par_iter().zip(src.par_chunks(block)).for_each(|(mut out, chunk)| {
        let mut at = [0usize; 256];
        for &e in chunk {
            let d = digit(e);
            out[d][at[d]] = e;
            at[d] += 1;
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<E: Entry>(keys: &[f32], descending: bool) {
        let mut data: Vec<E> = keys.iter().enumerate().map(|(i, &k)| E::new(ordered_bits(k, descending), i)).collect();
        let mut scratch = vec![E::default(); data.len()];
        sort(&mut data, &mut scratch);
        let mut want: Vec<usize> = (0..keys.len()).collect();
        want.sort_by(|&a, &b| {
            let o = keys[a].total_cmp(&keys[b]);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        assert_eq!(data.iter().map(|e| e.index()).collect::<Vec<_>>(), want);
    }

    #[test]
    fn matches_a_stable_comparison_sort_with_ties_and_specials() {
        let mut keys: Vec<f32> =
            (0..200_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f32 - 500.0).collect();
        keys.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40]);
        for descending in [false, true] {
            check::<u64>(&keys, descending);
            check::<Wide>(&keys, descending);
            check::<u64>(&keys[..5], descending);
        }
    }

    #[test]
    fn equal_keys_keep_their_order() {
        check::<u64>(&[1.0; 70_000], true);
        check::<u64>(&[], false);
    }
}
