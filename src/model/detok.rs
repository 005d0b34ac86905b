//! Incremental detokenization for streaming: turns generated ids, one at a time, into text
//! deltas that are always valid, complete UTF-8 (the TGI `prefix_offset` / `read_offset` scheme).
//!
//! Invariants:
//! - Only a window of recent ids is decoded per step (`ids[prefix_offset..]`), so a step costs
//!   O(window), not O(generated); ids before `prefix_offset` are dropped.
//! - A delta is released only when the window's text grows and does not end in U+FFFD (a byte
//!   sequence still waiting for its continuation bytes), so no delta ever splits a character.
//! - Concatenating every `push` delta and the `finish` remainder equals decoding all ids at once
//!   (for byte-level decoders, which decode a sequence as the concatenation of its tokens' bytes).
use std::sync::Arc;

use tokenizers::Tokenizer;

/// The replacement character lossy UTF-8 decoding emits for incomplete byte sequences.
const REPLACEMENT: char = '\u{FFFD}';

/// Errors from the underlying tokenizer's `decode`.
#[derive(Debug, thiserror::Error)]
pub enum DetokError {
    /// The tokenizer failed to decode the window (e.g. an id outside its vocabulary).
    #[error("decoding token ids failed: {0}")]
    Decode(String),
}

impl DetokError {
    /// Stable machine-readable code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Decode(_) => "detok.decode",
        }
    }
}

/// Streams text out of a growing sequence of token ids; one per generated sequence.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special: bool,
    /// The undecoded-context window: ids from `prefix_offset` on.
    ids: Vec<u32>,
    /// Index in `ids` where text not yet released starts (`ids[..read]` is already emitted).
    read: usize,
    /// `decode(ids[..read])`, cached.
    prefix_text: String,
}

impl std::fmt::Debug for IncrementalDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("skip_special", &self.skip_special)
            .field("window", &self.ids)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

/// Length of the longest common prefix of `a` and `b` that ends on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, ca), cb)| ca != cb).map(|((i, _), _)| i).unwrap_or_else(|| a.len().min(b.len()))
}

impl IncrementalDecoder {
    /// A decoder with an empty history. `skip_special` drops special tokens (e.g. `<|im_end|>`)
    /// from the text, like `decode(.., skip_special_tokens = true)`.
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, ids: Vec::new(), read: 0, prefix_text: String::new() }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, DetokError> {
        self.tokenizer.decode(ids, self.skip_special).map_err(|e| DetokError::Decode(e.to_string()))
    }

    /// The text after the released prefix, given the window's full text. Normally a plain
    /// suffix; if a decoder rewrote the prefix, the delta starts where the texts diverge.
    fn delta_of<'a>(&self, text: &'a str) -> &'a str {
        if text.starts_with(self.prefix_text.as_str()) {
            &text[self.prefix_text.len()..]
        } else {
            &text[common_prefix_len(text, &self.prefix_text)..]
        }
    }

    /// Appends `id`; returns the newly complete text, or `None` while it is still buffered (an
    /// unfinished UTF-8 sequence, or a token that decodes to nothing such as a skipped special).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, DetokError> {
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        if text.len() <= self.prefix_text.len() || text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let delta = self.delta_of(&text).to_string();
        // Slide the window: the just-read ids become the new prefix context.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.decode(&self.ids)?;
        Ok(if delta.is_empty() { None } else { Some(delta) })
    }

    /// Flushes everything still buffered (lossily: an unfinished sequence becomes U+FFFD) and
    /// resets the decoder; `None` if nothing was pending.
    pub fn finish(&mut self) -> Result<Option<String>, DetokError> {
        let text = self.decode(&self.ids)?;
        let delta = self.delta_of(&text).to_string();
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
        Ok(if delta.is_empty() { None } else { Some(delta) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::tests::{byte_char, tiny_content};
    use crate::model::tokenizer::tokenizer_from_gguf;

    fn tiny() -> Arc<Tokenizer> {
        Arc::new(tokenizer_from_gguf(&tiny_content("smollm")).expect("tiny tokenizer"))
    }

    fn byte_id(tok: &Tokenizer, b: u8) -> u32 {
        tok.token_to_id(&byte_char(b).to_string()).expect("byte token")
    }

    /// Streams `ids`, checking each delta, and returns the concatenation.
    fn stream(tok: &Arc<Tokenizer>, ids: &[u32], skip: bool) -> (String, usize) {
        let mut d = IncrementalDecoder::new(tok.clone(), skip);
        let (mut out, mut n) = (String::new(), 0);
        for &id in ids {
            if let Some(s) = d.push(id).expect("push") {
                assert!(!s.contains(REPLACEMENT), "delta {s:?} has U+FFFD");
                assert!(!s.is_empty());
                out.push_str(&s);
                n += 1;
            }
        }
        if let Some(s) = d.finish().expect("finish") {
            out.push_str(&s);
        }
        (out, n)
    }

    #[test]
    fn multibyte_char_is_released_whole() {
        let tok = tiny();
        let ids = tok.encode("a ☕ é", false).expect("encode").get_ids().to_vec();
        // ☕ is E2 98 95: three single-byte tokens.
        let coffee: Vec<u32> = "☕".bytes().map(|b| byte_id(&tok, b)).collect();
        assert!(ids.windows(3).any(|w| w == coffee.as_slice()), "{ids:?}");
        let mut d = IncrementalDecoder::new(tok.clone(), true);
        let deltas: Vec<Option<String>> = ids.iter().map(|&i| d.push(i).expect("push")).collect();
        assert!(deltas.iter().flatten().all(|s| !s.contains(REPLACEMENT)));
        assert!(deltas.contains(&Some("☕".to_string())), "{deltas:?}");
        let (all, _) = stream(&tok, &ids, true);
        assert_eq!(all, tok.decode(&ids, true).expect("decode"));
        assert_eq!(all, "a ☕ é");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let tok = tiny();
        let ids = tok.encode("<|im_start|>ab<|endoftext|>", false).expect("encode").get_ids().to_vec();
        assert_eq!(stream(&tok, &ids, true).0, "ab");
        assert_eq!(stream(&tok, &ids, false).0, "<|im_start|>ab<|endoftext|>");
    }

    #[test]
    fn unfinished_sequence_is_flushed_lossily_by_finish() {
        let tok = tiny();
        let ids = [byte_id(&tok, b'x'), byte_id(&tok, 0xE2), byte_id(&tok, 0x98)];
        let mut d = IncrementalDecoder::new(tok.clone(), true);
        assert_eq!(d.push(ids[0]).expect("push"), Some("x".into()));
        assert_eq!(d.push(ids[1]).expect("push"), None);
        assert_eq!(d.push(ids[2]).expect("push"), None);
        assert_eq!(d.finish().expect("finish"), Some(tok.decode(&ids[1..], true).expect("decode")));
        assert_eq!(d.finish().expect("finish"), None);
    }

    #[test]
    fn window_stays_small_over_long_streams() {
        let tok = tiny();
        let text = "ab ☕ ".repeat(200);
        let ids = tok.encode(text.as_str(), false).expect("encode").get_ids().to_vec();
        let mut d = IncrementalDecoder::new(tok.clone(), true);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.push(id).expect("push").unwrap_or_default());
            assert!(d.ids.len() <= 8, "window grew to {}", d.ids.len());
        }
        out.push_str(&d.finish().expect("finish").unwrap_or_default());
        assert_eq!(out, text);
    }

    #[test]
    fn unknown_ids_are_skipped_and_prefixes_compare_by_char() {
        let mut d = IncrementalDecoder::new(tiny(), true);
        // `tokenizers` drops ids it does not know when decoding; that must not panic or emit.
        assert_eq!(d.push(u32::MAX).expect("unknown id"), None);
        assert_eq!(common_prefix_len("héllo", "hélp"), 4);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
    }
}
