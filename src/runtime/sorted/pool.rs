//! Large buffers kept between calls.
//!
//! A fresh 64 MiB buffer costs about 16,000 first-touch page faults (30-45 ms here),
//! more than a whole pass over it, and the allocator returns large blocks to the
//! system on free. So the engine takes its full-length buffers from this pool and
//! gives them back when done; the next call (a training loop calls the loss once per
//! step) finds them mapped. A taken buffer holds stale values: every user overwrites
//! all of it. The pool keeps at most `KEEP` buffers of each type, so it holds about
//! what one call needs at once. `clear` frees them.

use std::sync::Mutex;

use super::radix::Wide;

/// Buffers of one type kept at most.
const KEEP: usize = 16;

/// Element types the pool holds.
pub trait Pooled: Default + Send + Sized + 'static {
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
}

macro_rules! pooled {
    ($($t:ty),*) => {$(
        impl Pooled for $t {
            fn pool() -> &'static Mutex<Vec<Vec<Self>>> {
                static POOL: Mutex<Vec<Vec<$t>>> = Mutex::new(Vec::new());
                &POOL
            }
        }
    )*};
}
pooled!(f64, f32, u32, u64, Wide);

/// A buffer of `n` values (stale, or default-filled if newly allocated).
pub fn take<T: Pooled>(n: usize) -> Vec<T> {
    let found = {
        let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        // The smallest buffer that fits, so big ones stay for big requests.
        let best = pool.iter().enumerate().filter(|(_, v)| v.capacity() >= n).min_by_key(|(_, v)| v.capacity());
        best.map(|(i, _)| i).map(|i| pool.swap_remove(i))
    };
    let mut v = found.unwrap_or_else(|| fresh(n));
    if v.len() > n {
        v.truncate(n);
    } else {
        v.resize_with(n, T::default);
    }
    v
}

/// An empty buffer with room for `n` values, its pages not yet touched, and (on Linux)
/// marked for transparent huge pages before they are: the engine reads and writes
/// these buffers through permutations, and with 4 KiB pages nearly every such access
/// misses the TLB (measured here: a random gather from 2 MiB pages took 0.65 of the time).
fn fresh<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    advise_huge(v.as_ptr().cast(), n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(p: *const u8, len: usize) {
    const MADV_HUGEPAGE: std::ffi::c_int = 14;
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: std::ffi::c_int) -> std::ffi::c_int;
    }
    const PAGE: usize = 4096;
    let (start, end) = ((p as usize).next_multiple_of(PAGE), (p as usize + len) / PAGE * PAGE);
    if end > start {
        // SAFETY: the range lies inside one live allocation of ours (rounded inwards to
        // whole pages); MADV_HUGEPAGE only changes how its pages are backed, never their
        // contents, and a failure (no THP support) leaves the buffer as it was.
        unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: *const u8, _: usize) {}

/// Returns a buffer to the pool (or frees it if the pool is full).
pub fn give<T: Pooled>(v: Vec<T>) {
    if v.capacity() == 0 {
        return;
    }
    let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEEP {
        pool.push(v);
    } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.capacity()) {
        if smallest.capacity() < v.capacity() {
            *smallest = v;
        }
    }
}

/// Frees every pooled buffer.
pub fn clear() {
    fn drain<T: Pooled>() {
        T::pool().lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    drain::<f64>();
    drain::<f32>();
    drain::<u32>();
    drain::<u64>();
    drain::<Wide>();
}
