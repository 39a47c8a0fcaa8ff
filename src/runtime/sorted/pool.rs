//! Large buffers kept between calls.
//!
//! A fresh 64 MiB buffer costs about 16,000 first-touch page faults (30-45 ms here),
//! more than a whole pass over it, and the allocator returns large blocks to the
//! system on free. So the engine takes its full-length buffers from this pool and
//! gives them back when done; the next call (a training loop calls the loss once per
//! step) finds them mapped. A taken buffer holds stale values: every user overwrites
//! all of it. The pool keeps at most `KEEP` buffers of each type, so it holds about
//! what one call needs at once. `clear` frees them.

use std::sync::atomic::AtomicU64;
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
pooled!(f64, u64, Wide, AtomicU64);

/// A buffer of `n` values (stale, or default-filled if newly allocated).
pub fn take<T: Pooled>(n: usize) -> Vec<T> {
    let found = {
        let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        // The smallest buffer that fits, so big ones stay for big requests.
        let best = pool.iter().enumerate().filter(|(_, v)| v.capacity() >= n).min_by_key(|(_, v)| v.capacity());
        best.map(|(i, _)| i).map(|i| pool.swap_remove(i))
    };
    let mut v = found.unwrap_or_default();
    if v.len() > n {
        v.truncate(n);
    } else {
        v.resize_with(n, T::default);
    }
    v
}

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
    drain::<u64>();
    drain::<Wide>();
    drain::<AtomicU64>();
}
