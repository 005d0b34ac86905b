//! Bounded label values for per-module metrics: module ids and composition names become label
//! values, and nothing a client sends may grow the number of series without bound.
//!
//! Invariant: at most `top_n` distinct values keep their own label (the first ones seen); every
//! later value is counted under [`OTHER_LABEL`].
use std::collections::HashSet;
use std::sync::Mutex;

/// Label values with a bounded count: the first `top_n` distinct values seen keep their own
/// label, later ones are counted under `other`.
pub struct LabelBudget {
    top_n: usize,
    seen: Mutex<HashSet<String>>,
}

/// The label of everything beyond the budget.
pub const OTHER_LABEL: &str = "other";

impl LabelBudget {
    pub fn new(top_n: usize) -> Self {
        Self { top_n, seen: Mutex::new(HashSet::new()) }
    }

    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.top_n {
            seen.insert(value.to_string());
            return value.to_string();
        }
        OTHER_LABEL.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let b = LabelBudget::new(2);
        assert_eq!(b.label("a"), "a");
        assert_eq!(b.label("b"), "b");
        assert_eq!(b.label("c"), OTHER_LABEL);
        assert_eq!(b.label("a"), "a");
        for i in 0..1000 {
            assert_eq!(b.label(&format!("x{i}")), OTHER_LABEL);
        }
        assert_eq!(b.seen.lock().unwrap().len(), 2);
    }
}
