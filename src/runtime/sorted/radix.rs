//! A stable radix sort of records (key, element index, payload) by a 32-bit key, in parallel.
//!
//! Stability is what the `Sort` op needs (ties keep element order), and it makes the
//! result unique: the output does not depend on how the work was split across threads.
//!
//! A pass of an LSD radix sort over memory moves every record; four of them (one per
//! byte) cost more than the rest of a Lovász loss. So a large input is first split,
//! in one counting read and one moving pass, into at most 256 buckets of consecutive
//! key ranges and about equal size: a histogram of the key's top 16 bits (below the
//! bits every key shares) is cut into runs of at most n/127 records. Each bucket then
//! fits in cache and is sorted there by an LSD radix sort on bytes, skipping the
//! bytes its keys share. A bucket still too large (many keys with the same top bits)
//! is split again on the next 16 bits. Blocks of the input count and move in
//! parallel, each into its own slice per bucket (cut safely with `split_at_mut`);
//! buckets sort in parallel.

use rayon::prelude::*;

/// Fewer records than this are split by one thread.
const MIN_BLOCK: usize = 1 << 16;

/// Buckets of at most this many bytes are sorted by bytes, in the last-level cache
/// (their scratch as much again). Measured at 16M records of 16 bytes, one split
/// into buckets of 2 MB and then bytes took 0.8 of the time of four passes on bytes
/// over memory; splitting again into buckets that fit in L2 was slower (1.1).
const CACHE_BYTES: usize = 4 << 20;

/// Bits of the key that one split looks at.
const SPLIT_BITS: u32 = 16;

/// A record of a sort: the order-preserving bits of its key, and whatever travels with it.
pub trait Record: Copy + Send + Sync + 'static {
    fn key(&self) -> u32;
}

/// `[key, element index, payload...]`: the payload is carried through the sort so that
/// later passes read it in sorted order instead of gathering it at random.
impl<const W: usize> Record for [u32; W] {
    fn key(&self) -> u32 {
        self[0]
    }
}

/// Key and a 64-bit index, for tensors beyond 2^32 elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wide {
    pub key: u32,
    pub index: u64,
}

impl Record for Wide {
    fn key(&self) -> u32 {
        self.key
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
pub fn sort<E: Record>(data: &mut [E], scratch: &mut [E]) {
    let n = data.len();
    sort_to(data, &mut scratch[..n], 32, false);
}

/// Sorts the records of `a` (whose keys agree on every bit from `hi` up) into `a`, or
/// into `b` if `into_b`; the other is clobbered.
fn sort_to<E: Record>(a: &mut [E], b: &mut [E], hi: u32, into_b: bool) {
    if std::mem::size_of_val(a) <= CACHE_BYTES || hi == 0 {
        return lsd(a, b, into_b);
    }
    let split = Split::new(a, hi);
    split.scatter(a, b);
    // The records are in `b` now, bucket after bucket: sort each back into place.
    let sizes: Vec<usize> = split.buckets.iter().map(|k| k.len).collect();
    let from = cut(b, &sizes);
    let other = cut(a, &sizes);
    from.into_par_iter().zip(other).zip(&split.buckets).for_each(|((bk, ak), k)| {
        // A bucket's keys agree on the prefix bits its first and last prefixes share.
        let hi = split.shift + (usize::BITS - (k.first ^ k.last).leading_zeros());
        sort_to(bk, ak, hi, !into_b);
    });
}

/// Cuts `rest` into consecutive slices of the given lengths.
fn cut<'a, E>(mut rest: &'a mut [E], sizes: &[usize]) -> Vec<&'a mut [E]> {
    sizes
        .iter()
        .map(|&len| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        })
        .collect()
}

/// A bucket of a split: its size, and the first and last prefix of its records.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    len: usize,
    first: usize,
    last: usize,
}

/// How one pass splits records into buckets by `SPLIT_BITS` bits of the key at `shift`.
struct Split {
    shift: u32,
    block: usize,
    /// The bucket of each prefix (runs of consecutive prefixes).
    table: Vec<u8>,
    buckets: Vec<Bucket>,
    /// Per block of the input, how many of its records go to each bucket.
    counts: Vec<[usize; 256]>,
}

impl Split {
    fn new<E: Record>(a: &[E], hi: u32) -> Split {
        let n = a.len();
        let shift = hi.saturating_sub(SPLIT_BITS);
        let mask = (1usize << (hi - shift)) - 1;
        let prefix = |e: &E| (e.key() >> shift) as usize & mask;
        // Blocks below 2^32 records, so that u32 counts cannot wrap.
        let block = n.div_ceil(rayon::current_num_threads().max(1)).clamp(MIN_BLOCK, 1 << 31);
        let hists: Vec<Vec<u32>> = a
            .par_chunks(block)
            .map(|chunk| {
                let mut h = vec![0u32; mask + 1];
                for e in chunk {
                    h[prefix(e)] += 1;
                }
                h
            })
            .collect();
        // Runs of prefixes closed before they pass n / 127 records: any two neighbouring
        // buckets hold more than that together, so there are at most 253.
        let cap = n.div_ceil(127);
        let mut table = vec![0u8; mask + 1];
        let mut buckets = vec![Bucket::default()];
        for p in 0..=mask {
            let c: usize = hists.iter().map(|h| h[p] as usize).sum();
            if c == 0 {
                table[p] = (buckets.len() - 1) as u8;
                continue;
            }
            let last = buckets.last_mut().expect("invariant: one bucket at least");
            if last.len > 0 && last.len + c > cap {
                buckets.push(Bucket { len: 0, first: p, last: p });
            }
            let k = buckets.len() - 1;
            let last = &mut buckets[k];
            if last.len == 0 {
                last.first = p;
            }
            last.len += c;
            last.last = p;
            table[p] = k as u8;
        }
        let counts = hists
            .iter()
            .map(|h| {
                let mut c = [0usize; 256];
                for (p, &x) in h.iter().enumerate() {
                    c[table[p] as usize] += x as usize;
                }
                c
            })
            .collect();
        Split { shift, block, table, buckets, counts }
    }

    /// Moves the records of `src` into `dst`, bucket after bucket, in order within each.
    fn scatter<E: Record>(&self, src: &[E], dst: &mut [E]) {
        let (shift, table) = (self.shift, &self.table);
        let mask = table.len() - 1;
        // Output slices in (bucket, block) order: block b's records of bucket k go after
        // every record of an earlier bucket and after earlier blocks' records of bucket k.
        let mut slices: Vec<Vec<&mut [E]>> = self.counts.iter().map(|_| Vec::with_capacity(256)).collect();
        let mut rest = dst;
        for k in 0..256 {
            for (b, c) in self.counts.iter().enumerate() {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(c[k]);
                slices[b].push(head);
                rest = tail;
            }
        }
        slices.into_par_iter().zip(src.par_chunks(self.block)).for_each(|(out, chunk)| {
            let out: [&mut [E]; 256] = out.try_into().unwrap_or_else(|_| unreachable!("one slice per bucket"));
            scatter(chunk.iter().copied(), out, |e| table[(e.key() >> shift) as usize & mask] as usize);
        });
    }
}

/// An LSD radix sort on bytes, for records that fit in cache: `a` into `a`, or into `b`
/// if `into_b`; the other is clobbered. Bytes every key shares are skipped.
fn lsd<E: Record>(a: &mut [E], b: &mut [E], into_b: bool) {
    let n = a.len();
    let mut hist = [[0usize; 256]; 4];
    for e in a.iter() {
        let k = e.key();
        for (d, h) in hist.iter_mut().enumerate() {
            h[((k >> (8 * d)) & 0xff) as usize] += 1;
        }
    }
    let mut in_a = true;
    for (d, h) in hist.iter().enumerate() {
        if h.contains(&n) {
            continue;
        }
        let (src, dst): (&[E], &mut [E]) = if in_a { (&*a, &mut *b) } else { (&*b, &mut *a) };
        let mut at = [0usize; 256];
        let mut sum = 0;
        for (o, &c) in at.iter_mut().zip(h) {
            *o = sum;
            sum += c;
        }
        let shift = 8 * d as u32;
        for e in src {
            let k = ((e.key() >> shift) & 0xff) as usize;
            dst[at[k]] = *e;
            at[k] += 1;
        }
        in_a = !in_a;
    }
    match (in_a, into_b) {
        (true, true) => b.copy_from_slice(a),
        (false, false) => a.copy_from_slice(b),
        _ => {}
    }
}

/// Appends each record of `records` to `out[bucket(record)]`, in order, each slice
/// filled exactly. (Buffering a few records per bucket and writing them out together
/// measured slower here, 1.5x; non-temporal stores gained only a tenth.)
pub fn scatter<E: Copy, const B: usize>(
    records: impl Iterator<Item = E>,
    out: [&mut [E]; B],
    bucket: impl Fn(&E) -> usize,
) {
    let mut at = [0usize; B];
    for e in records {
        let d = bucket(&e);
        out[d][at[d]] = e;
        at[d] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn check(keys: &[f32], descending: bool) {
        let mut data: Vec<[u32; 3]> =
            keys.iter().enumerate().map(|(i, &k)| [ordered_bits(k, descending), i as u32, k.to_bits()]).collect();
        let mut scratch = vec![[0; 3]; data.len()];
        sort(&mut data, &mut scratch);
        assert!(data.iter().all(|r| keys[r[1] as usize].to_bits() == r[2]), "the payload travels with its record");
        let mut wide: Vec<Wide> =
            keys.iter().enumerate().map(|(i, &k)| Wide { key: ordered_bits(k, descending), index: i as u64 }).collect();
        let mut scratch = vec![Wide::default(); wide.len()];
        sort(&mut wide, &mut scratch);
        assert!(wide.iter().zip(&data).all(|(w, r)| w.index == u64::from(r[1])));
        let mut want: Vec<usize> = (0..keys.len()).collect();
        want.sort_by(|&a, &b| {
            let o = keys[a].total_cmp(&keys[b]);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        assert_eq!(data.iter().map(|r| r[1] as usize).collect::<Vec<_>>(), want);
    }

    #[test]
    fn matches_a_stable_comparison_sort_with_ties_and_specials() {
        let mut keys: Vec<f32> =
            (0..200_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f32 - 500.0).collect();
        keys.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40]);
        for descending in [false, true] {
            check(&keys, descending);
            check(&keys[..5], descending);
        }
    }

    #[test]
    fn equal_keys_keep_their_order() {
        check(&[1.0; 70_000], true);
        check(&[-2.5; 400_000], false);
        check(&[], false);
    }

    /// Keys packed into a few top-16-bit prefixes: buckets too large for cache split again.
    #[test]
    fn crowded_keys_split_again() {
        let mut s = 7u64;
        let keys: Vec<f32> = (0..600_000)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                if i % 6 == 0 {
                    u * 100.0 - 50.0
                } else {
                    1.0 + u / 256.0
                }
            })
            .collect();
        check(&keys, true);
        check(&keys, false);
    }

    /// Sorting time against rayon's unstable sort of (f32, u32) pairs, at 16M records of
    /// four words (`cargo test --release --lib radix::tests::throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        let n = 1 << 24;
        let mut s = 11u64;
        let keys: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
                let v = (((s >> 16) & 0xffffff) as f32 + 0.5) / (1u64 << 24) as f32;
                1.0 + (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let median = |mut t: Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        // Huge pages, as the engine's buffers.
        let mut data_words = super::super::pool::take::<u32>(4 * n);
        let mut scratch_words = super::super::pool::take::<u32>(4 * n);
        let data = data_words.as_chunks_mut::<4>().0;
        let scratch = scratch_words.as_chunks_mut::<4>().0;
        let mut pairs: Vec<(f32, u32)> = Vec::with_capacity(n);
        for _ in 0..9 {
            for (i, (r, k)) in data.iter_mut().zip(&keys).enumerate() {
                *r = [ordered_bits(*k, true), i as u32, k.to_bits(), 0];
            }
            let t = std::time::Instant::now();
            sort(&mut *data, &mut *scratch);
            ours.push(t.elapsed().as_secs_f64());
            pairs.clear();
            pairs.extend(keys.iter().enumerate().map(|(i, &k)| (k, i as u32)));
            let t = std::time::Instant::now();
            pairs.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            theirs.push(t.elapsed().as_secs_f64());
        }
        assert!(data.windows(2).all(|w| w[0][0] <= w[1][0]));
        let (a, b) = (median(ours), median(theirs));
        println!("radix {:.1} ms, rayon {:.1} ms, ratio {:.2}", a * 1e3, b * 1e3, a / b);
    }
}
