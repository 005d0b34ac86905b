//! Text <-> token ids: builds a Hugging Face `tokenizers::Tokenizer` from GGUF metadata (or loads
//! a `tokenizer.json`), so GGUF-only models tokenize exactly like their HF originals.
//!
//! Invariants:
//! - Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is built from GGUF; token ids are the
//!   indices of `tokenizer.ggml.tokens`, merges come from `tokenizer.ggml.merges` ("a b" strings).
//! - The pre-tokenizer is chosen from `tokenizer.ggml.pre` and mirrors the HF `tokenizer.json` of
//!   that model family; an unknown pre type is an error, never a silent fallback (a wrong split
//!   changes token ids without any visible failure).
//! - Every control (type 3) or user-defined (type 4) token is a *special* added token: it matches
//!   literally in input text and is dropped by `decode(.., skip_special_tokens = true)`.
//! - Callers encode with `add_special_tokens = false`; BOS insertion is decided by the caller from
//!   [`TokenizerInfo::add_bos`] (no post-processor template adds BOS/EOS here).
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF `token_type` of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of user-defined added tokens.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3 (`llama-bpe`) split regex, as in its `tokenizer.json`.
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 split regex (digits one at a time), as in its `tokenizer.json`.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors building or loading a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata has no `{0}`")]
    MissingKey(String),
    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata `{key}`: {reason}")]
    BadValue { key: String, reason: String },
    /// `tokenizer.ggml.model` is not a kind this module can build.
    #[error("unsupported tokenizer model `{0}` (only byte-level BPE `gpt2` is supported from GGUF)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer whose split rules are not implemented.
    #[error(
        "unsupported pre-tokenizer `{0}` (supported: default, gpt2, gpt-2, smollm, starcoder, \
         refact, codeshell, llama3, llama-bpe, qwen2)"
    )]
    UnsupportedPre(String),
    /// The `tokenizers` library rejected the assembled pieces (e.g. a merge out of vocabulary).
    #[error("building tokenizer: {0}")]
    Build(String),
    /// A `tokenizer.json` could not be read or parsed.
    #[error("loading {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl TokenizerError {
    /// Stable machine-readable code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey(_) => "tokenizer.missing_key",
            Self::BadValue { .. } => "tokenizer.bad_value",
            Self::UnsupportedModel(_) => "tokenizer.unsupported_model",
            Self::UnsupportedPre(_) => "tokenizer.unsupported_pre",
            Self::Build(_) => "tokenizer.build",
            Self::File { .. } => "tokenizer.file",
        }
    }
}

/// Special-token facts a caller needs around encoding and generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerInfo {
    /// `tokenizer.ggml.bos_token_id`, if present.
    pub bos: Option<u32>,
    /// Ids that end generation: just `tokenizer.ggml.eos_token_id` (empty if absent). Chat-turn
    /// terminators such as `<|im_end|>` / `<|eot_id|>` are *not* added automatically.
    pub eos: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`; `false` when absent (byte-level BPE models such as
    /// SmolLM2 add no BOS).
    pub add_bos: bool,
}

fn bad(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::BadValue { key: key.into(), reason: reason.into() }
}

/// Any GGUF integer variant as i64.
fn int_of(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value, TokenizerError> {
    content.metadata.get(key).ok_or_else(|| TokenizerError::MissingKey(key.into()))
}

fn get_str<'a>(content: &'a Content, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(bad(key, "expected a string")),
    }
}

fn get_u32(content: &Content, key: &str) -> Result<Option<u32>, TokenizerError> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => int_of(v).and_then(|i| u32::try_from(i).ok()).map(Some).ok_or_else(|| bad(key, "expected a non-negative integer")),
    }
}

fn get_string_array<'a>(content: &'a Content, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let arr = get(content, key)?.to_vec().map_err(|_| bad(key, "expected an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(bad(key, format!("element {i} is not a string"))),
        })
        .collect()
}

/// The token strings of `tokenizer.ggml.tokens` (index = id).
pub fn gguf_tokens(content: &Content) -> Result<Vec<&str>, TokenizerError> {
    get_string_array(content, "tokenizer.ggml.tokens")
}

/// The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` type, mirroring HF's `tokenizer.json`.
/// Also returns whether BPE must use `ignore_merges` (Llama 3) and whether NFC applies (Qwen2).
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool, bool), TokenizerError> {
    let byte_level = ByteLevel::new(false, true, true);
    let split = |pattern: &str| {
        Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex for `{pre}`: {e}")))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level.into(), false, false),
        // llama.cpp groups these: `\p{N}` split first, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            (Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(), false, false)
        }
        "llama3" | "llama-bpe" => {
            (Sequence::new(vec![split(LLAMA3_PATTERN)?.into(), ByteLevel::new(false, true, false).into()]).into(), true, false)
        }
        "qwen2" => (Sequence::new(vec![split(QWEN2_PATTERN)?.into(), ByteLevel::new(false, false, false).into()]).into(), false, true),
        other => return Err(TokenizerError::UnsupportedPre(other.into())),
    })
}

/// Builds a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata, equivalent to the
/// model's Hugging Face `tokenizer.json` (see the module docs for the invariants).
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer, TokenizerError> {
    let model = get_str(content, "tokenizer.ggml.model")?.ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.into()));
    }
    let pre = get_str(content, "tokenizer.ggml.pre")?.unwrap_or("default");
    let (pre_tokenizer, ignore_merges, nfc) = pre_tokenizer_for(pre)?;

    let tokens = gguf_tokens(content)?;
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| bad("tokenizer.ggml.tokens", "more than u32::MAX tokens"))?;
        // Keep the first id of a duplicated string, as a JSON vocab map would hold only one.
        vocab.entry((*tok).to_string()).or_insert(id);
    }
    let merges: Merges = get_string_array(content, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad("tokenizer.ggml.merges", format!("merge {i} `{m}` is not \"a b\"")))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut tok = Tokenizer::new(bpe);
    if nfc {
        tok.with_normalizer(Some(NFC));
    }
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    if content.metadata.contains_key("tokenizer.ggml.token_type") {
        let types =
            get(content, "tokenizer.ggml.token_type")?.to_vec().map_err(|_| bad("tokenizer.ggml.token_type", "expected an array"))?;
        if types.len() != tokens.len() {
            return Err(bad("tokenizer.ggml.token_type", format!("{} entries for {} tokens", types.len(), tokens.len())));
        }
        let mut specials = Vec::new();
        for (i, t) in types.iter().enumerate() {
            let t = int_of(t).ok_or_else(|| bad("tokenizer.ggml.token_type", format!("element {i} is not an integer")))?;
            if t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED {
                specials.push(AddedToken::from(tokens[i].to_string(), true));
            }
        }
        tok.add_special_tokens(&specials);
    }
    Ok(tok)
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn tokenizer_from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
    let path = path.as_ref();
    Tokenizer::from_file(path).map_err(|e| TokenizerError::File { path: path.into(), reason: e.to_string() })
}

/// Reads BOS/EOS ids and the add-BOS flag from GGUF metadata (see [`TokenizerInfo`]).
pub fn info_from_gguf(content: &Content) -> Result<TokenizerInfo, TokenizerError> {
    let bos = get_u32(content, "tokenizer.ggml.bos_token_id")?;
    let eos = get_u32(content, "tokenizer.ggml.eos_token_id")?.into_iter().collect();
    let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
        None => false,
        Some(v) => v.to_bool().map_err(|_| bad("tokenizer.ggml.add_bos_token", "expected a bool"))?,
    };
    Ok(TokenizerInfo { bos, eos, add_bos })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The GPT-2 byte -> printable char map (as in `tokenizers`' byte-level pre-tokenizer).
    pub(crate) fn byte_char(b: u8) -> char {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        if printable {
            return b as char;
        }
        let n =
            (0..b).filter(|&x| !((b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x))).count() as u32;
        char::from_u32(256 + n).expect("valid char")
    }

    /// A tiny GGUF-like content: the 256 byte tokens, two merges, and two control tokens.
    pub(crate) fn tiny_content(pre: &str) -> Content {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        let mut types = vec![3i32, 3];
        for b in 0..=255u8 {
            tokens.push(byte_char(b).to_string());
            types.push(1);
        }
        tokens.push("ab".into());
        tokens.push("Ġab".into());
        types.extend([1, 1]);
        let mut md = HashMap::new();
        let s = |x: &str| Value::String(x.into());
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s(pre));
        md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect()));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
        md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b"), s("Ġ ab")]));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn builds_and_round_trips_tiny_vocab() {
        let tok = tokenizer_from_gguf(&tiny_content("smollm")).expect("build");
        let enc = tok.encode("<|im_start|>ab ab 12", false).expect("encode");
        let ab = tok.token_to_id("ab").expect("ab");
        let gab = tok.token_to_id("Ġab").expect("Ġab");
        let one = tok.token_to_id("1").expect("1");
        let two = tok.token_to_id("2").expect("2");
        let space = tok.token_to_id("Ġ").expect("Ġ");
        assert_eq!(enc.get_ids(), &[1, ab, gab, space, one, two]);
        assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), "<|im_start|>ab ab 12");
        assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), "ab ab 12");
    }

    #[test]
    fn every_supported_pre_builds_and_unknown_pre_is_named() {
        for pre in ["default", "gpt2", "smollm", "starcoder", "llama3", "llama-bpe", "qwen2"] {
            let tok = tokenizer_from_gguf(&tiny_content(pre)).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let ids = tok.encode("ab, ☕ 2024", false).expect("encode").get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).expect("decode"), "ab, ☕ 2024", "{pre}");
        }
        let err = tokenizer_from_gguf(&tiny_content("made-up")).expect_err("must fail");
        assert_eq!(err.code(), "tokenizer.unsupported_pre");
        assert!(err.to_string().contains("made-up"));
    }

    #[test]
    fn rejects_bad_metadata() {
        let mut c = tiny_content("gpt2");
        c.metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        assert_eq!(tokenizer_from_gguf(&c).expect_err("spm").code(), "tokenizer.unsupported_model");
        let mut c = tiny_content("gpt2");
        c.metadata.insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("nospace".into())]));
        assert_eq!(tokenizer_from_gguf(&c).expect_err("merge").code(), "tokenizer.bad_value");
        let mut c = tiny_content("gpt2");
        c.metadata.insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("zz q".into())]));
        assert_eq!(tokenizer_from_gguf(&c).expect_err("oov").code(), "tokenizer.build");
        let mut c = tiny_content("gpt2");
        c.metadata.remove("tokenizer.ggml.tokens");
        assert_eq!(tokenizer_from_gguf(&c).expect_err("missing").code(), "tokenizer.missing_key");
    }

    #[test]
    fn info_reads_ids_and_defaults_add_bos_false() {
        let info = info_from_gguf(&tiny_content("gpt2")).expect("info");
        assert_eq!(info, TokenizerInfo { bos: Some(1), eos: vec![0], add_bos: false });
        let mut c = tiny_content("gpt2");
        c.metadata.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        c.metadata.remove("tokenizer.ggml.eos_token_id");
        let info = info_from_gguf(&c).expect("info");
        assert!(info.add_bos && info.eos.is_empty());
    }
}
