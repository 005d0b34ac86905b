//! OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) and their translation into
//! engine requests, plus the `modserve` vendor extension that carries a full composition.
//!
//! Invariant: every field is either honoured, or refused with a 400 naming it: a field we do not
//! implement (`n > 1`, `tools`, penalties, `logit_bias`, `echo`, ...) never passes silently.
//! Fields sent as `null` count as absent (some clients send every field).
use serde::Deserialize;
use serde_json::{Map, Value};

use super::common::{bad_request, ApiError};
use crate::adapters::composition::{CompositionSpec, DeltaRef};
use crate::adapters::formats::poly::Routing;
use crate::engine::prepare::{EngineRequest, PromptInput};
use crate::engine::sequence::GenerateSpec;
use crate::model::chat::ChatMessage;
use crate::model::sampling::SamplingParams;

/// `max_tokens` of a completion when the request leaves it out (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// `max_tokens` of a chat completion when the request leaves it out (OpenAI's is "until the
/// context ends"; the KV budget reserves what a request may use, so the default stays modest).
pub const DEFAULT_CHAT_TOKENS: usize = 512;
/// Largest `logprobs` (completions) / `top_logprobs` (chat), as OpenAI's API allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Fields accepted and ignored: they change nothing about the result.
const IGNORED: [&str; 4] = ["user", "metadata", "store", "service_tier"];

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct ExtDelta {
    pub module_id: String,
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

#[derive(Deserialize)]
pub struct ExtRoute {
    pub inventory_id: String,
    pub task_id: Option<i64>,
    pub weights: Option<Vec<f32>>,
}

/// The `modserve` vendor extension: the composition as the gRPC request carries it, and the
/// sampling settings OpenAI's API lacks.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    #[serde(default)]
    pub deltas: Vec<ExtDelta>,
    pub route: Option<ExtRoute>,
    pub top_k: Option<u32>,
    pub min_tokens: Option<u32>,
    pub request_id: Option<String>,
}

/// What both endpoints share.
#[derive(Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub modserve: Option<Extension>,
}

/// `prompt`: text, token ids, or a one-element list of either.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Prompt,
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A chat message's content: text, or a list of parts of which only `text` parts are supported.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A parsed request: the engine request plus what shapes the response.
#[derive(Debug)]
pub struct Parsed {
    pub req: EngineRequest,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Return logprobs (chat: `logprobs: true`; completions: `logprobs` set).
    pub logprobs: bool,
}

/// Refuses unknown and unsupported fields (null values count as absent).
fn check_other(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in other {
        if v.is_null() || IGNORED.contains(&k.as_str()) {
            continue;
        }
        let ok = match k.as_str() {
            "best_of" => v.as_u64() == Some(1),
            "echo" => v.as_bool() == Some(false),
            "logit_bias" => v.as_object().is_some_and(|m| m.is_empty()),
            "tools" | "functions" => v.as_array().is_some_and(|a| a.is_empty()),
            "tool_choice" | "function_call" => v.as_str() == Some("none"),
            "parallel_tool_calls" => v.is_boolean(),
            "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
            "suffix" => v.as_str() == Some(""),
            _ => false,
        };
        if !ok {
            return Err(bad_request(
                "unsupported_field",
                format!("`{}` is not supported by this server (value {})", crate::adapters::error::clip(k), clip_json(v)),
            ));
        }
    }
    Ok(())
}

fn clip_json(v: &Value) -> String {
    crate::adapters::error::clip(&v.to_string()).into_owned()
}

fn ext_composition(ext: &Extension) -> Result<CompositionSpec, ApiError> {
    let route = match &ext.route {
        None => None,
        Some(ExtRoute { inventory_id, task_id: Some(t), weights: None }) => Some((inventory_id.clone(), Routing::Task(*t))),
        Some(ExtRoute { inventory_id, task_id: None, weights: Some(w) }) => Some((inventory_id.clone(), Routing::Weights(w.clone()))),
        Some(_) => return Err(bad_request("invalid_argument", "modserve.route needs exactly one of task_id and weights")),
    };
    Ok(CompositionSpec { deltas: ext.deltas.iter().map(|d| DeltaRef { id: d.module_id.clone(), scale: d.scale }).collect(), route })
}

fn build(common: Common, prompt: PromptInput, top_logprobs: usize, logprobs: bool, default_tokens: usize) -> Result<Parsed, ApiError> {
    if let Some(n) = common.n {
        if n != 1 {
            return Err(bad_request("unsupported_field", format!("`n` = {n}: this server returns one choice per request (n = 1)")));
        }
    }
    for (name, v) in [("presence_penalty", common.presence_penalty), ("frequency_penalty", common.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(bad_request("unsupported_field", format!("`{name}` is not supported (only 0)")));
        }
    }
    if common.model.is_empty() {
        return Err(bad_request("invalid_argument", "`model` is required: the base model's name, `base`, a module, a composition"));
    }
    let max_tokens = match (common.max_tokens, common.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad_request("invalid_argument", "`max_tokens` and `max_completion_tokens` differ: give one"));
        }
        (Some(a), _) | (None, Some(a)) => a as usize,
        (None, None) => default_tokens,
    };
    if max_tokens == 0 {
        return Err(bad_request("invalid_argument", "`max_tokens` must be at least 1"));
    }
    let ext = common.modserve.unwrap_or_default();
    let sampling = SamplingParams {
        temperature: common.temperature.unwrap_or(1.0),
        top_k: ext.top_k.unwrap_or(0) as usize,
        top_p: common.top_p.unwrap_or(1.0),
        // OpenAI's seed is any integer: its two's-complement bits seed the sampler.
        seed: common.seed.unwrap_or(0) as u64,
        top_logprobs,
    };
    sampling.validate().map_err(|e| bad_request("invalid_argument", e.to_string()))?;
    let stop = match common.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
    let stream = common.stream.unwrap_or(false);
    let request_id = ext.request_id.clone().unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    Ok(Parsed {
        req: EngineRequest {
            prompt,
            spec: GenerateSpec {
                prompt_ids: vec![],
                max_new_tokens: max_tokens,
                min_new_tokens: ext.min_tokens.unwrap_or(0) as usize,
                stop,
                sampling,
            },
            composition: ext_composition(&ext)?,
            deadline: None,
            request_id,
        },
        model: common.model,
        stream,
        include_usage,
        logprobs,
    })
}

fn check_top(n: u32, field: &str) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(bad_request("invalid_argument", format!("`{field}` = {n}: at most {MAX_TOP_LOGPROBS}")));
    }
    Ok(n as usize)
}

impl CompletionRequest {
    pub fn parse(self) -> Result<Parsed, ApiError> {
        check_other(&self.other)?;
        let prompt = match self.prompt {
            Prompt::Text(t) => PromptInput::Text(t),
            Prompt::Ids(ids) => PromptInput::TokenIds(ids),
            Prompt::Texts(mut v) if v.len() == 1 => PromptInput::Text(v.remove(0)),
            Prompt::IdLists(mut v) if v.len() == 1 => PromptInput::TokenIds(v.remove(0)),
            _ => return Err(bad_request("unsupported_field", "`prompt` holds several prompts: send one per request")),
        };
        let top = check_top(self.logprobs.unwrap_or(0), "logprobs")?;
        build(self.common, prompt, top, self.logprobs.is_some(), DEFAULT_COMPLETION_TOKENS)
    }
}

impl ChatRequest {
    pub fn parse(self) -> Result<Parsed, ApiError> {
        check_other(&self.other)?;
        if self.messages.is_empty() {
            return Err(bad_request("invalid_argument", "`messages` needs at least one message"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(bad_request(
                                    "unsupported_field",
                                    format!("message content part of type {:?}: only `text` parts are supported", kind.unwrap_or("?")),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage { role: m.role, content });
        }
        let logprobs = self.logprobs.unwrap_or(false);
        let top = match self.top_logprobs {
            Some(n) if !logprobs && n > 0 => return Err(bad_request("invalid_argument", "`top_logprobs` needs `logprobs: true`")),
            Some(n) => check_top(n, "top_logprobs")?,
            None => 0,
        };
        build(self.common, PromptInput::Chat(messages), top, logprobs, DEFAULT_CHAT_TOKENS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Parsed, String> {
        let r: ChatRequest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        r.parse().map_err(|e| e.0.message().to_string())
    }

    fn completion(v: Value) -> Result<Parsed, String> {
        let r: CompletionRequest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        r.parse().map_err(|e| e.0.message().to_string())
    }

    #[test]
    fn supported_fields_are_honoured() {
        let p = chat(serde_json::json!({
            "model": "a+b@0.5", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 7, "temperature": 0, "top_p": 0.9, "seed": -1, "stop": "x",
            "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3,
            "n": 1, "user": "u", "tools": null,
            "modserve": {"deltas": [{"module_id": "c", "scale": 2}], "route": {"inventory_id": "p", "task_id": 1}, "top_k": 5}
        }))
        .unwrap();
        assert_eq!(p.req.spec.max_new_tokens, 7);
        assert_eq!(p.req.spec.sampling.temperature, 0.0);
        assert_eq!(p.req.spec.sampling.top_k, 5);
        assert_eq!(p.req.spec.sampling.top_logprobs, 3);
        assert_eq!(p.req.spec.sampling.seed, u64::MAX);
        assert_eq!(p.req.spec.stop, vec!["x".to_string()]);
        assert!(p.stream && p.include_usage && p.logprobs);
        assert_eq!(p.req.composition.deltas, vec![DeltaRef { id: "c".into(), scale: 2.0 }]);
        assert_eq!(p.req.composition.route, Some(("p".into(), Routing::Task(1))));
        assert!(matches!(&p.req.prompt, PromptInput::Chat(m) if m[0].content == "Hi"));
        let c = completion(serde_json::json!({"model": "base", "prompt": [[1, 2, 3]], "logprobs": 0})).unwrap();
        assert!(matches!(&c.req.prompt, PromptInput::TokenIds(ids) if ids == &[1, 2, 3]));
        assert_eq!(c.req.spec.max_new_tokens, DEFAULT_COMPLETION_TOKENS);
        assert_eq!(c.req.spec.sampling.temperature, 1.0);
        assert!(c.logprobs && !c.stream);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let base = || serde_json::json!({"model": "base", "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v, needle) in [
            ("n", serde_json::json!(2), "`n`"),
            ("tools", serde_json::json!([{"type": "function"}]), "`tools`"),
            ("presence_penalty", serde_json::json!(0.5), "presence_penalty"),
            ("logit_bias", serde_json::json!({"1": 5}), "logit_bias"),
            ("response_format", serde_json::json!({"type": "json_object"}), "response_format"),
            ("frobnicate", serde_json::json!(true), "frobnicate"),
            ("top_logprobs", serde_json::json!(3), "needs `logprobs"),
            ("max_tokens", serde_json::json!(0), "at least 1"),
        ] {
            let mut b = base();
            b[k] = v;
            let e = chat(b).unwrap_err();
            assert!(e.contains(needle), "{k}: {e}");
        }
        let e = completion(serde_json::json!({"model": "base", "prompt": ["a", "b"]})).unwrap_err();
        assert!(e.contains("several prompts"), "{e}");
        let e = completion(serde_json::json!({"model": "base", "prompt": "a", "echo": true})).unwrap_err();
        assert!(e.contains("`echo`"), "{e}");
        let e = completion(serde_json::json!({"model": "base", "prompt": "a", "logprobs": 21})).unwrap_err();
        assert!(e.contains("at most 20"), "{e}");
        let e = chat(serde_json::json!({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})).unwrap_err();
        assert!(e.contains("image_url"), "{e}");
        assert!(chat(serde_json::json!({"model": "", "messages": [{"role": "user", "content": "x"}]})).is_err());
    }
}
