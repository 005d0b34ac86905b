//! Batching policy, pure and testable without a model: which running sequences feed how many
//! tokens in the next step.
//!
//! Invariants: the planned tokens never exceed `max_batch_tokens` (except that one sequence may
//! always make progress when the budget is smaller than a single decode token); every decoding
//! sequence that is not blocked gets its one token before any prefill chunk is planned, so decode
//! latency stays bounded while long prompts are prefilled in chunks; prefill is first-come
//! first-served.

/// What the scheduler knows of one running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Prompt tokens not yet in the KV cache (0 = decoding).
    pub pending_prompt: usize,
    /// Cannot run now (its client has not read the previous tokens yet).
    pub blocked: bool,
}

/// Step budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
}

/// Tokens per sequence for the next step (0 = sits out), in the order of `seqs`.
pub fn plan_step(seqs: &[SeqState], budget: StepBudget) -> Vec<usize> {
    let mut plan = vec![0; seqs.len()];
    let mut left = budget.max_batch_tokens.max(1);
    for (i, s) in seqs.iter().enumerate() {
        if !s.blocked && s.pending_prompt == 0 && left > 0 {
            plan[i] = 1;
            left -= 1;
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if left == 0 {
            break;
        }
        if !s.blocked && s.pending_prompt > 0 {
            let n = s.pending_prompt.min(budget.prefill_chunk.max(1)).min(left);
            plan[i] = n;
            left -= n;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(pending: usize, blocked: bool) -> SeqState {
        SeqState { pending_prompt: pending, blocked }
    }

    #[test]
    fn decodes_first_then_chunked_prefill_fcfs() {
        let b = StepBudget { max_batch_tokens: 10, prefill_chunk: 4 };
        let plan = plan_step(&[st(100, false), st(0, false), st(3, false), st(0, true), st(0, false)], b);
        assert_eq!(plan, vec![4, 1, 3, 0, 1]);
        let plan = plan_step(&[st(100, false), st(100, false), st(0, false)], StepBudget { max_batch_tokens: 6, prefill_chunk: 4 });
        assert_eq!(plan, vec![4, 1, 1]);
    }

    proptest! {
        #[test]
        fn never_exceeds_the_token_budget(
            seqs in proptest::collection::vec((0usize..300, any::<bool>()), 0..64),
            max_batch_tokens in 1usize..512,
            prefill_chunk in 1usize..256,
        ) {
            let seqs: Vec<SeqState> = seqs.into_iter().map(|(p, b)| st(p, b)).collect();
            let plan = plan_step(&seqs, StepBudget { max_batch_tokens, prefill_chunk });
            prop_assert!(plan.iter().sum::<usize>() <= max_batch_tokens);
            for (p, s) in plan.iter().zip(&seqs) {
                prop_assert!(!s.blocked || *p == 0);
                prop_assert!(*p <= s.pending_prompt.max(1));
                prop_assert!(*p <= prefill_chunk.max(1) || s.pending_prompt == 0);
            }
            // Decoders are served before any prefill when the budget allows all of them.
            let decoders = seqs.iter().filter(|s| !s.blocked && s.pending_prompt == 0).count();
            if decoders <= max_batch_tokens {
                for (p, s) in plan.iter().zip(&seqs) {
                    if !s.blocked && s.pending_prompt == 0 { prop_assert_eq!(*p, 1); }
                }
            }
        }
    }
}
