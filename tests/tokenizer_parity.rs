//! Tokenizer / chat template / streaming detokenizer parity against Hugging Face reference ids
//! (`tests/fixtures/parity/cases.json`) on the real SmolLM2-135M-Instruct GGUF.
//!
//! The model is required, not optional: it is looked up at `$MODSERVE_MODEL`, else at
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` in the crate root; a missing model fails the test
//! with instructions rather than skipping it.
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use modserve::model::{chat, detok, tokenizer};

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/SmolLM2-135M-Instruct.Q4_1.gguf");
const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity/cases.json");

fn model_path() -> PathBuf {
    let p = std::env::var_os("MODSERVE_MODEL").map(PathBuf::from).unwrap_or_else(|| DEFAULT_MODEL.into());
    assert!(
        p.is_file(),
        "model not found at {} (set MODSERVE_MODEL or run `modserve fetch-model` / the scripts that \
         place SmolLM2-135M-Instruct.Q4_1.gguf under models/)",
        p.display()
    );
    p
}

fn content() -> Content {
    let path = model_path();
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Content::read(&mut f).unwrap_or_else(|e| panic!("read GGUF {}: {e}", path.display()))
}

struct Cases {
    prompts: Vec<String>,
    ids: Vec<Vec<u32>>,
}

fn cases() -> Cases {
    let text = std::fs::read_to_string(CASES).expect("read cases.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("parse cases.json");
    let prompts: Vec<String> = serde_json::from_value(v["prompts"].clone()).expect("prompts");
    let ids: Vec<Vec<u32>> = serde_json::from_value(v["prompt_token_ids"].clone()).expect("prompt_token_ids");
    assert_eq!(prompts.len(), 3);
    assert_eq!(ids.len(), prompts.len());
    Cases { prompts, ids }
}

#[test]
fn prompts_encode_to_reference_ids_and_decode_back() {
    let c = content();
    let tok = tokenizer::tokenizer_from_gguf(&c).expect("tokenizer from GGUF");
    assert_eq!(tok.get_vocab_size(true), 49152);
    let cases = cases();
    for (prompt, want) in cases.prompts.iter().zip(&cases.ids) {
        let enc = tok.encode(prompt.as_str(), false).expect("encode");
        assert_eq!(enc.get_ids(), want.as_slice(), "ids of {prompt:?}");
        assert_eq!(&tok.decode(want, false).expect("decode"), prompt);
    }
    // Special tokens are atomic and dropped when skipping specials.
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let chat_ids = &cases.ids[1];
    let skipped = tok.decode(chat_ids, true).expect("decode");
    assert!(!skipped.contains("<|im_"), "{skipped:?}");
}

#[test]
fn info_matches_smollm2() {
    let info = tokenizer::info_from_gguf(&content()).expect("info");
    assert_eq!(info, tokenizer::TokenizerInfo { bos: Some(1), eos: vec![2], add_bos: false });
}

#[test]
fn chat_template_reproduces_reference_prompt() {
    let c = content();
    let tpl = chat::ChatTemplate::from_gguf(&c).expect("compile").expect("GGUF has a chat template");
    assert_eq!(tpl.bos_token(), "<|im_start|>");
    assert_eq!(tpl.eos_token(), "<|im_end|>");
    let msgs = [chat::ChatMessage::new("user", "What is the capital of France?")];
    let out = tpl.render(&msgs, true).expect("render");
    assert_eq!(out, cases().prompts[1]);
}

#[test]
fn streaming_unicode_prompt_matches_full_decode() {
    let tok = Arc::new(tokenizer::tokenizer_from_gguf(&content()).expect("tokenizer"));
    let cases = cases();
    for (prompt, ids) in cases.prompts.iter().zip(&cases.ids) {
        for skip in [true, false] {
            let mut d = detok::IncrementalDecoder::new(tok.clone(), skip);
            let mut out = String::new();
            for &id in ids {
                if let Some(s) = d.push(id).expect("push") {
                    assert!(!s.contains('\u{FFFD}'), "delta {s:?} of {prompt:?}");
                    out.push_str(&s);
                }
            }
            out.push_str(&d.finish().expect("finish").unwrap_or_default());
            assert_eq!(out, tok.decode(ids, skip).expect("decode"), "{prompt:?} skip={skip}");
        }
    }
    // Prompt 3 holds multi-byte characters split across byte tokens (☕ = 242, 239, ...).
    assert_eq!(tok.decode(&cases.ids[2], true).expect("decode"), cases.prompts[2]);
}
