//! One generation in flight: its prompt, KV cache, sampler, generated tokens, text and finish
//! state. The engine feeds it logits; it decides the next token and when to stop.
//!
//! Invariants: `text` is the UTF-8 decode of the generated tokens (special tokens skipped) cut at
//! the first stop string; text deltas handed out never contain a partial character and never
//! contain text that a stop string may later remove; once finished, a sequence takes no input.
use std::sync::Arc;

use crate::adapters::composition::Composition;
use crate::model::detok::IncrementalDecoder;
use crate::model::kv_cache::SeqKvCache;
use crate::model::sampling::{Sampled, Sampler, SamplingError, SamplingParams, TokenLogprob};

/// What a caller asks of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSpec {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    /// End-of-sequence tokens are suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// The model's context (or the sequence's KV budget) is full.
    Context,
    /// Stopped by an engine error (the client received the error instead).
    Aborted,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Context => "context",
            Self::Aborted => "aborted",
        }
    }
}

/// Errors a sequence can hit while generating.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("detokenization failed: {0}")]
    Detok(String),
}

/// Result of feeding one set of logits.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub sampled: Sampled,
    /// Newly releasable text (may be empty).
    pub text_delta: String,
    pub finished: Option<FinishReason>,
}

/// A sequence being generated.
pub struct Sequence {
    pub spec: GenerateSpec,
    pub cache: SeqKvCache,
    /// The adapter deltas of this request (pinned until the sequence is dropped).
    pub composition: Option<Arc<Composition>>,
    sampler: Sampler,
    detok: Option<IncrementalDecoder>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    pub generated: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    eos: Arc<[u32]>,
}

impl Sequence {
    /// `cache` must have room for the prompt plus `max_new_tokens` (or the context, if smaller).
    pub fn new(
        spec: GenerateSpec,
        cache: SeqKvCache,
        tokenizer: Option<Arc<tokenizers::Tokenizer>>,
        eos: Arc<[u32]>,
    ) -> Result<Self, SequenceError> {
        let sampler = Sampler::new(spec.sampling.clone())?;
        let detok = tokenizer.map(|t| IncrementalDecoder::new(t, true));
        let mut s = Self {
            spec,
            cache,
            composition: None,
            sampler,
            detok,
            prefilled: 0,
            generated: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text: String::new(),
            emitted: 0,
            finish: None,
            eos,
        };
        if s.spec.max_new_tokens == 0 {
            s.finish = Some(FinishReason::Length);
        }
        Ok(s)
    }

    /// Stops the sequence (after an engine error); it takes no more input.
    pub fn abort(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Aborted);
        }
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The full text so far (cut at a stop string once finished).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Prompt tokens not yet in the cache.
    pub fn pending_prompt(&self) -> usize {
        self.spec.prompt_ids.len() - self.prefilled
    }

    /// Tokens to feed next: up to `max_chunk` prompt tokens, else the last generated token.
    /// Empty once finished.
    pub fn next_input(&self, max_chunk: usize) -> &[u32] {
        if self.finish.is_some() {
            return &[];
        }
        if self.pending_prompt() > 0 {
            let end = (self.prefilled + max_chunk.max(1)).min(self.spec.prompt_ids.len());
            &self.spec.prompt_ids[self.prefilled..end]
        } else {
            match self.generated.last() {
                Some(t) => std::slice::from_ref(t),
                None => &[],
            }
        }
    }

    /// Records that `n` fed tokens are now in the cache. Returns true when the sequence now
    /// expects logits (its prompt is fully prefilled).
    pub fn consumed(&mut self, n: usize) -> bool {
        if self.pending_prompt() > 0 {
            self.prefilled += n;
        }
        self.pending_prompt() == 0
    }

    /// Samples from the logits after the last fed token and updates text and finish state.
    /// `logits` is the step's row, read in place; while `min_new_tokens` holds, a copy with the
    /// end-of-sequence entries set to minus infinity is sampled instead.
    pub fn on_logits(&mut self, logits: &[f32]) -> Result<TokenEvent, SequenceError> {
        let sampled = if self.generated.len() < self.spec.min_new_tokens && !self.eos.is_empty() {
            // End-of-sequence tokens masked in a copy of the row (the step's logits are shared).
            let mut masked = logits.to_vec();
            for &e in self.eos.iter() {
                if let Some(l) = masked.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            self.sampler.sample(&masked)?
        } else {
            self.sampler.sample(logits)?
        };
        let id = sampled.token.id;
        self.generated.push(id);
        self.logprobs.push(sampled.token);
        self.top_logprobs.push(sampled.top.clone());
        let is_eos = self.eos.contains(&id);
        if !is_eos {
            if let Some(d) = self.detok.as_mut() {
                if let Some(piece) = d.push(id).map_err(|e| SequenceError::Detok(e.to_string()))? {
                    self.text.push_str(&piece);
                }
            }
        }
        if is_eos {
            self.finish = Some(FinishReason::Eos);
        } else if self.cut_at_stop() {
            self.finish = Some(FinishReason::Stop);
        } else if self.generated.len() >= self.spec.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        } else if self.cache.len() + 1 > self.cache.capacity() {
            self.finish = Some(FinishReason::Context);
        }
        if self.finish.is_some() && self.finish != Some(FinishReason::Stop) {
            self.flush_detok()?;
        }
        let text_delta = self.take_delta();
        Ok(TokenEvent { sampled, text_delta, finished: self.finish })
    }

    fn flush_detok(&mut self) -> Result<(), SequenceError> {
        if let Some(d) = self.detok.as_mut() {
            if let Some(rest) = d.finish().map_err(|e| SequenceError::Detok(e.to_string()))? {
                self.text.push_str(&rest);
                self.cut_at_stop();
            }
        }
        Ok(())
    }

    /// Truncates `text` at the earliest stop string; true if one was found.
    fn cut_at_stop(&mut self) -> bool {
        // A stop string can only start within the last (new text + longest stop) bytes.
        let longest = self.spec.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        if longest == 0 {
            return false;
        }
        let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(longest));
        let hit =
            self.spec.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        match hit {
            Some(i) => {
                self.text.truncate(i);
                true
            }
            None => false,
        }
    }

    /// Text that can be released now: everything once finished, else all but a tail that could
    /// still be the start of a stop string.
    fn take_delta(&mut self) -> String {
        let end = if self.finish.is_some() {
            self.text.len()
        } else {
            let hold = self.spec.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            floor_char_boundary(&self.text, self.text.len().saturating_sub(hold))
        };
        if end <= self.emitted {
            return String::new();
        }
        let d = self.text[self.emitted..end].to_string();
        self.emitted = end;
        d
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
