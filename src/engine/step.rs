//! One batch step: gather the next rows of every running sequence (a prefill chunk or one decode
//! token each), run the model once over all of them, and hand each sequence its logits.
//!
//! Invariant: a sequence's KV cache and token state only change through [`run_step`]; sequences
//! that finished are skipped.
use rayon::prelude::*;

use super::sequence::{Sequence, SequenceError, TokenEvent};
use crate::adapters::batch::BatchDeltas;
use crate::kernels::host::with_host_f32;
use crate::model::llama::{Llama, SeqChunk};

/// Errors of a batch step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("model forward failed: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
}

/// Runs one step over `seqs`, each with its own composition; sequence `i` feeds at most
/// `limits[i]` tokens (0 = sits this step out). Returns, per sequence, the event of the token it
/// generated (None when it only advanced its prefill, sat out, or was already finished).
/// A sequence's own failure (e.g. sampling) is returned in its slot and does not fail the step.
pub fn run_step(
    model: &Llama,
    seqs: &mut [&mut Sequence],
    limits: &[usize],
) -> Result<Vec<Option<Result<TokenEvent, SequenceError>>>, StepError> {
    assert_eq!(seqs.len(), limits.len(), "one limit per sequence");
    let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(seqs.len());
    let mut wants = Vec::with_capacity(seqs.len());
    for (s, &limit) in seqs.iter().zip(limits) {
        let input = if limit == 0 { Vec::new() } else { s.next_input(limit).to_vec() };
        wants.push(!input.is_empty() && s.pending_prompt() <= input.len());
        inputs.push(input);
    }
    let mut events: Vec<Option<Result<TokenEvent, SequenceError>>> = (0..seqs.len()).map(|_| None).collect();
    let active: Vec<usize> = (0..seqs.len()).filter(|&i| !inputs[i].is_empty()).collect();
    if active.is_empty() {
        return Ok(events);
    }
    let _step = if active.iter().any(|&i| inputs[i].len() > 1 || seqs[i].pending_prompt() > 0) {
        tracing::trace_span!(target: crate::model::PHASE, "prefill_step").entered()
    } else {
        tracing::trace_span!(target: crate::model::PHASE, "decode_step").entered()
    };
    let comps: Vec<_> = active.iter().map(|&i| seqs[i].composition.clone()).collect();
    let deltas = BatchDeltas::new(active.iter().zip(&comps).map(|(&i, c)| (inputs[i].len(), c.as_deref())), model.cfg.tie_word_embeddings);
    let mut chunks: Vec<SeqChunk<'_>> = Vec::with_capacity(active.len());
    for (i, s) in seqs.iter_mut().enumerate() {
        if !inputs[i].is_empty() {
            chunks.push(SeqChunk { tokens: &inputs[i], cache: &mut s.cache, want_logits: wants[i] });
        }
    }
    let logits = model.forward(&mut chunks, &deltas)?;
    drop(chunks);
    let mut needs = vec![false; seqs.len()];
    for &i in &active {
        needs[i] = seqs[i].consumed(inputs[i].len());
        debug_assert_eq!(needs[i], wants[i]);
    }
    if !needs.contains(&true) {
        return Ok(events);
    }
    // Sequences sample in parallel: each owns its sampler, and a vocabulary-wide pass per row
    // (normaliser, argmax) costs as much as a layer at batch 32. Logits rows follow batch order
    // and are read in place (a copy of every row, 6 MB at batch 32, took a third of the phase).
    let _sample = tracing::trace_span!(target: crate::model::PHASE, "sample").entered();
    let logits = if logits.device().is_cpu() { logits } else { logits.to_device(&candle_core::Device::Cpu)? };
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let results = with_host_f32(&logits, |flat| {
        let work: Vec<(usize, &mut Sequence, &[f32])> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| needs[*i])
            .zip(flat.chunks_exact(vocab))
            .map(|((i, s), l)| (i, &mut **s, l))
            .collect();
        Ok(work.into_par_iter().map(|(i, s, l)| (i, s.on_logits(l))).collect::<Vec<_>>())
    })?;
    for (i, r) in results {
        events[i] = Some(r);
    }
    Ok(events)
}

/// Runs `seqs` to completion, one step after another (the CLI and tests use this; the server's
/// scheduler interleaves arrivals between steps instead).
pub fn run_to_completion(model: &Llama, seqs: &mut [&mut Sequence], prefill_chunk: usize) -> Result<(), StepError> {
    let limits = vec![prefill_chunk.max(1); seqs.len()];
    while seqs.iter().any(|s| s.finished().is_none()) {
        for ev in run_step(model, seqs, &limits)?.into_iter().flatten() {
            ev?;
        }
    }
    Ok(())
}
