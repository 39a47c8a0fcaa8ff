//! What a `Loss` keeps between calls: code compiled for one shape of call, built on first
//! use and shared by every thread that evaluates the loss.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Values built once per key. Cloning gives an empty cache (a cloned loss compiles anew).
pub struct Cache<K, V>(Mutex<HashMap<K, Arc<V>>>);

impl<K: Hash + Eq + Clone, V> Cache<K, V> {
    /// The value for `key`, built by `build` if there is none yet.
    ///
    /// The lock is not held while building: a build compiles kernels in parallel on the
    /// thread pool, and a pool thread waiting for it may meanwhile take up another call's
    /// evaluation, which asks this cache again (a lock held there would deadlock). So
    /// concurrent first calls may each build; the first value stored is the one kept.
    pub fn get_or_build<E>(&self, key: &K, build: impl FnOnce() -> Result<V, E>) -> Result<Arc<V>, E> {
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = lock().get(key) {
            return Ok(Arc::clone(v));
        }
        let v = Arc::new(build()?);
        Ok(Arc::clone(lock().entry(key.clone()).or_insert(v)))
    }
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache(Mutex::new(HashMap::new()))
    }
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache::default()
    }
}

impl<K, V> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "Cache({n} built)")
    }
}
