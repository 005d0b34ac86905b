//! Test-only fault injection for the engine actor: the failures that containment must survive
//! (a sequence failing alone, a panicking batch step, a dying engine thread), triggered by token
//! ids in a prompt.
//!
//! Invariant: compiled into debug builds only (`cfg!(debug_assertions)`); a release binary never
//! reads `MODSERVE_FAULT_INJECT`.

/// Test-only fault hooks (debug builds only; read from `MODSERVE_FAULT_INJECT`):
/// `seq_fail:ID` makes the sequences whose prompt holds token ID fail on their own after each
/// step (as a sampling failure would: INTERNAL for them, their batch neighbours go on),
/// `step_panic:ID` panics inside a batch step that feeds token ID (contained: that step's
/// sequences fail with INTERNAL), `engine_panic:ID` panics in the engine loop itself (the thread
/// dies: the server must say so and exit).
#[derive(Default)]
pub struct Faults {
    pub seq_fail: Option<u32>,
    pub step_panic: Option<u32>,
    pub engine_panic: Option<u32>,
}

impl Faults {
    pub fn from_env() -> Self {
        let mut f = Self::default();
        if cfg!(debug_assertions) {
            let v = std::env::var("MODSERVE_FAULT_INJECT").unwrap_or_default();
            for part in v.split(',') {
                match part.split_once(':') {
                    Some(("seq_fail", id)) => f.seq_fail = id.parse().ok(),
                    Some(("step_panic", id)) => f.step_panic = id.parse().ok(),
                    Some(("engine_panic", id)) => f.engine_panic = id.parse().ok(),
                    _ => {}
                }
            }
        }
        f
    }
}
