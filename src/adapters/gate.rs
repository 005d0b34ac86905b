//! A bound on concurrent module work: cold loads, merges and Poly mixtures (the work a request
//! may trigger before the engine's queue limit applies).
//!
//! Invariants: at most `slots` holders at once; at most `max_waiting` callers wait, and a caller
//! beyond that is refused at once (`adapter_load_busy`, RESOURCE_EXHAUSTED); a waiter gives up at
//! its deadline with the same error. A burst over many distinct modules therefore reads at most
//! `slots` files at a time, and cannot queue more than `max_waiting` loads.
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::error::AdapterError;

/// Default bound on concurrent cold loads and mixtures (a load is mostly one core's work), and on
/// callers waiting for one.
pub const DEFAULT_LOAD_SLOTS: usize = 2;
pub const DEFAULT_LOAD_WAITERS: usize = 64;

/// The gate. Cheap when uncontended (one mutex round trip).
pub struct LoadGate {
    slots: usize,
    max_waiting: usize,
    state: Mutex<GateState>,
    freed: Condvar,
}

#[derive(Default)]
struct GateState {
    busy: usize,
    waiting: usize,
}

/// A held slot; released on drop.
pub struct GatePermit<'a>(&'a LoadGate);

impl LoadGate {
    /// `slots` concurrent holders (at least 1), `max_waiting` callers waiting for one.
    pub fn new(slots: usize, max_waiting: usize) -> Self {
        Self { slots: slots.max(1), max_waiting, state: Mutex::new(GateState::default()), freed: Condvar::new() }
    }

    /// Takes a slot, waiting until `deadline` (None: until one frees) for one.
    pub fn acquire(&self, deadline: Option<Instant>) -> Result<GatePermit<'_>, AdapterError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.busy < self.slots {
            st.busy += 1;
            Self::publish(&st);
            return Ok(GatePermit(self));
        }
        if st.waiting >= self.max_waiting {
            metrics::counter!("modserve_adapter_load_busy_total").increment(1);
            return Err(AdapterError::Busy(format!(
                "{} module loads are running and {} are waiting (--max-concurrent-loads / --max-waiting-loads): retry later",
                self.slots, st.waiting
            )));
        }
        st.waiting += 1;
        loop {
            st = match deadline {
                None => self.freed.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    self.freed.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
            if st.busy < self.slots {
                st.waiting -= 1;
                st.busy += 1;
                Self::publish(&st);
                return Ok(GatePermit(self));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                st.waiting -= 1;
                metrics::counter!("modserve_adapter_load_busy_total").increment(1);
                return Err(AdapterError::Busy("the request's deadline passed while it waited for a module-load slot".into()));
            }
        }
    }

    fn publish(st: &GateState) {
        metrics::gauge!("modserve_adapter_loads_in_progress").set(st.busy as f64);
    }
}

impl Drop for GatePermit<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.busy -= 1;
        LoadGate::publish(&st);
        drop(st);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn slots_waiters_and_deadlines_are_bounded() {
        let gate = Arc::new(LoadGate::new(1, 1));
        let held = gate.acquire(None).unwrap();
        // One waiter may wait; it gets the slot when the holder lets go.
        let (g, (tx, rx)) = (gate.clone(), std::sync::mpsc::channel());
        let waiter = std::thread::spawn(move || {
            let p = g.acquire(Some(Instant::now() + Duration::from_secs(10)));
            tx.send(p.is_ok()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        });
        // Let the waiter register, then a second caller finds the wait queue full.
        let t0 = Instant::now();
        loop {
            if gate.state.lock().unwrap().waiting == 1 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the waiter never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = gate.acquire(None).err().expect("the wait queue is full");
        assert_eq!(e.code(), "adapter_load_busy");
        drop(held);
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "the waiter got the freed slot");
        waiter.join().unwrap();
        // A waiter whose deadline passes gives up with the same error, and leaves the queue.
        let held = gate.acquire(None).unwrap();
        let t0 = Instant::now();
        let e = gate.acquire(Some(Instant::now() + Duration::from_millis(50))).err().expect("deadline");
        assert_eq!(e.code(), "adapter_load_busy");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(gate.state.lock().unwrap().waiting, 0);
        drop(held);
        assert_eq!(gate.state.lock().unwrap().busy, 0);
    }
}
