//! The hot cache of loaded modules: a byte budget, LRU eviction that skips pinned entries, and
//! single-flight loading.
//!
//! Invariants: the bytes of resident entries never exceed the budget (an entry that cannot fit
//! without evicting a pinned one is refused with `CacheFull`, and the caller still gets its value,
//! unpinned by the cache); an entry is pinned while anyone outside the cache holds its `Arc` (an
//! in-flight request), and pinned entries are never evicted; N concurrent requests for a missing
//! key run the loader once (the others wait on the same cell); a failed load leaves nothing behind,
//! so the next request retries.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::error::AdapterError;

/// Something with a resident size.
pub trait Weighted {
    fn bytes(&self) -> usize;
}

/// Counters of cache activity (also exported through the `metrics` crate).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub load_micros: AtomicU64,
    pub evictions: AtomicU64,
    pub refused: AtomicU64,
}

/// A snapshot of [`CacheStats`] plus residency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub load_failures: u64,
    pub load_micros: u64,
    pub evictions: u64,
    pub refused: u64,
    pub entries: usize,
    pub bytes: usize,
    pub budget: usize,
}

struct Entry<V> {
    value: Arc<V>,
    bytes: usize,
    last_used: u64,
}

struct State<V> {
    entries: HashMap<String, Entry<V>>,
    bytes: usize,
    tick: u64,
    /// Entries evicted or unregistered while pinned: dropped as soon as nobody holds them.
    doomed: std::collections::HashSet<String>,
}

impl<V> State<V> {
    /// Drops doomed entries that are no longer pinned.
    fn sweep(&mut self, stats: &CacheStats) {
        if self.doomed.is_empty() {
            return;
        }
        let free: Vec<String> =
            self.doomed.iter().filter(|k| self.entries.get(*k).is_none_or(|e| Arc::strong_count(&e.value) == 1)).cloned().collect();
        for k in free {
            self.doomed.remove(&k);
            if let Some(e) = self.entries.remove(&k) {
                self.bytes -= e.bytes;
                stats.evictions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("modserve_adapter_cache_evictions_total").increment(1);
            }
        }
        self.publish();
    }

    fn publish(&self) {
        metrics::gauge!("modserve_adapter_cache_bytes").set(self.bytes as f64);
        metrics::gauge!("modserve_adapter_cache_entries").set(self.entries.len() as f64);
    }
}

type Cell<V> = Arc<OnceLock<Result<Arc<V>, AdapterError>>>;

/// Byte-bounded LRU cache with pinning and single-flight loads.
pub struct ModuleCache<V> {
    budget: usize,
    state: Mutex<State<V>>,
    inflight: Mutex<HashMap<String, Cell<V>>>,
    stats: CacheStats,
}

impl<V: Weighted> ModuleCache<V> {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            state: Mutex::new(State { entries: HashMap::new(), bytes: 0, tick: 0, doomed: Default::default() }),
            inflight: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Returns the cached value for `key` or loads it once with `load`, however many callers ask
    /// at the same time.
    pub fn get_or_load<F>(&self, key: &str, load: F) -> Result<Arc<V>, AdapterError>
    where
        F: FnOnce() -> Result<V, AdapterError>,
    {
        if let Some(v) = self.lookup(key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("modserve_adapter_cache_hits_total").increment(1);
            return Ok(v);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("modserve_adapter_cache_misses_total").increment(1);
        let cell = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            inflight.entry(key.to_string()).or_insert_with(|| Arc::new(OnceLock::new())).clone()
        };
        let mut ran = false;
        let result = cell
            .get_or_init(|| {
                ran = true;
                // A racing loader may have finished between our lookup and taking the cell.
                if let Some(v) = self.lookup(key) {
                    return Ok(v);
                }
                let t0 = Instant::now();
                let r = load().map(Arc::new);
                let us = t0.elapsed().as_micros() as u64;
                match &r {
                    Ok(v) => {
                        self.stats.loads.fetch_add(1, Ordering::Relaxed);
                        self.stats.load_micros.fetch_add(us, Ordering::Relaxed);
                        metrics::counter!("modserve_adapter_loads_total").increment(1);
                        metrics::histogram!("modserve_adapter_load_seconds").record(us as f64 / 1e6);
                        self.insert(key, v.clone());
                    }
                    Err(e) => {
                        self.stats.load_failures.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("modserve_adapter_load_failures_total", "code" => e.code()).increment(1);
                    }
                }
                r
            })
            .clone();
        if ran {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(key);
            }
        }
        result
    }

    /// The state, with unpinned doomed entries swept.
    fn state(&self) -> std::sync::MutexGuard<'_, State<V>> {
        let mut st = self.state.lock().expect("cache lock");
        st.sweep(&self.stats);
        st
    }

    fn lookup(&self, key: &str) -> Option<Arc<V>> {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        st.entries.get_mut(key).map(|e| {
            e.last_used = tick;
            e.value.clone()
        })
    }

    /// Inserts, evicting unpinned entries in LRU order. Refuses (keeps the value out of the cache)
    /// if it cannot fit.
    fn insert(&self, key: &str, value: Arc<V>) {
        let bytes = value.bytes();
        let mut st = self.state();
        if st.entries.contains_key(key) {
            return;
        }
        if bytes > self.budget {
            self.refuse(&st);
            return;
        }
        while st.bytes + bytes > self.budget {
            // Pinned: someone besides the cache holds the Arc.
            let victim = st
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.value) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    let e = st.entries.remove(&k).expect("victim present");
                    st.bytes -= e.bytes;
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("modserve_adapter_cache_evictions_total").increment(1);
                }
                None => {
                    self.refuse(&st);
                    return;
                }
            }
        }
        st.tick += 1;
        let tick = st.tick;
        st.bytes += bytes;
        st.entries.insert(key.to_string(), Entry { value, bytes, last_used: tick });
        st.publish();
    }

    fn refuse(&self, st: &State<V>) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("modserve_adapter_cache_refused_total").increment(1);
        tracing::warn!(resident = st.bytes, budget = self.budget, "adapter cache full of pinned modules; serving uncached");
    }

    /// Drops `key` now if it is not pinned, else as soon as the last request holding it finishes.
    /// Returns whether it was removed now.
    pub fn evict(&self, key: &str) -> bool {
        let mut st = self.state();
        let pinned = st.entries.get(key).map(|e| Arc::strong_count(&e.value) > 1);
        match pinned {
            Some(false) => {
                let e = st.entries.remove(key).expect("present");
                st.bytes -= e.bytes;
                st.doomed.remove(key);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("modserve_adapter_cache_evictions_total").increment(1);
                st.publish();
                true
            }
            Some(true) => {
                st.doomed.insert(key.to_string());
                false
            }
            None => false,
        }
    }

    /// Evicts every entry whose key starts with `prefix` (all versions of a module); pinned ones
    /// go when released. Returns how many were removed now.
    pub fn evict_prefix(&self, prefix: &str) -> usize {
        let keys: Vec<String> = self.state().entries.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        keys.iter().filter(|k| self.evict(k)).count()
    }

    /// The resident value of `key`, without touching LRU order or counters.
    pub fn peek(&self, key: &str) -> Option<Arc<V>> {
        self.state().entries.get(key).map(|e| e.value.clone())
    }

    /// Whether any resident key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.state().entries.keys().any(|k| k.starts_with(prefix))
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: &str) -> bool {
        self.state().entries.contains_key(key)
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        let st = self.state();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheSnapshot {
            hits: l(&self.stats.hits),
            misses: l(&self.stats.misses),
            loads: l(&self.stats.loads),
            load_failures: l(&self.stats.load_failures),
            load_micros: l(&self.stats.load_micros),
            evictions: l(&self.stats.evictions),
            refused: l(&self.stats.refused),
            entries: st.entries.len(),
            bytes: st.bytes,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug)]
    struct Blob(usize);
    impl Weighted for Blob {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn lru_eviction_skips_pinned() {
        let c = ModuleCache::new(100);
        let a = c.get_or_load("a", || Ok(Blob(40))).unwrap(); // pinned by `a`
        c.get_or_load("b", || Ok(Blob(40))).unwrap();
        c.get_or_load("c", || Ok(Blob(40))).unwrap(); // must evict b (a is pinned, older)
        assert!(c.contains("a") && !c.contains("b") && c.contains("c"));
        let s = c.snapshot();
        assert_eq!((s.evictions, s.bytes), (1, 80));
        // Everything resident pinned: a new entry is refused, not over budget.
        let _cc = c.get_or_load("c", || Ok(Blob(1))).unwrap();
        let d = c.get_or_load("d", || Ok(Blob(40))).unwrap();
        assert_eq!(d.0, 40);
        assert!(!c.contains("d"));
        assert_eq!(c.snapshot().refused, 1);
        assert!(c.snapshot().bytes <= 100);
        assert!(!c.evict("a"), "pinned entries are not evicted at once");
        assert!(c.contains("a"), "still resident while pinned");
        drop(a);
        assert!(!c.contains("a"), "an evicted entry goes as soon as it is released");
    }

    #[test]
    fn failed_loads_leave_nothing_and_retry() {
        let c: ModuleCache<Blob> = ModuleCache::new(100);
        let e = c.get_or_load("x", || Err(AdapterError::UnknownModule("x".into()))).unwrap_err();
        assert_eq!(e.code(), "unknown_module");
        assert!(!c.contains("x"));
        assert_eq!(c.get_or_load("x", || Ok(Blob(1))).unwrap().0, 1);
        assert_eq!(c.snapshot().load_failures, 1);
    }

    #[test]
    fn single_flight_under_concurrency() {
        let c = Arc::new(ModuleCache::new(1000));
        let calls = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (c, calls, barrier) = (c.clone(), calls.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    c.get_or_load("m", || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(Blob(10))
                    })
                    .unwrap()
                })
            })
            .collect();
        let got: Vec<Arc<Blob>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "loader ran more than once");
        assert!(got.iter().all(|g| Arc::ptr_eq(g, &got[0])));
    }

    proptest! {
        #[test]
        fn budget_is_never_exceeded_and_pins_survive(ops in proptest::collection::vec((0u8..12, 1usize..60, any::<bool>()), 1..200)) {
            let c = ModuleCache::new(128);
            let mut pins: Vec<(String, Arc<Blob>)> = Vec::new();
            for (k, size, pin) in ops {
                let key = format!("k{k}");
                let v = c.get_or_load(&key, || Ok(Blob(size))).unwrap();
                if pin {
                    // Only values the cache admitted are pinned entries of the cache.
                    if c.peek(&key).is_some_and(|r| Arc::ptr_eq(&r, &v)) {
                        pins.push((key, v));
                    }
                } else if size % 3 == 0 && !pins.is_empty() {
                    pins.remove(0);
                }
                let s = c.snapshot();
                prop_assert!(s.bytes <= 128, "resident {} > budget", s.bytes);
                for (k, p) in &pins {
                    let r = c.peek(k);
                    prop_assert!(r.is_some_and(|r| Arc::ptr_eq(&r, p)), "pinned entry {} was evicted", k);
                }
            }
        }
    }
}
