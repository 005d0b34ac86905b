//! The two generation endpoints: resolve, submit, and answer in OpenAI's shapes, whole
//! (`text_completion`, `chat.completion`) or as server-sent events (`..chunk` objects, an optional
//! usage chunk, then `data: [DONE]`).
//!
//! Invariants: a request reaches the engine exactly as a gRPC request would (same resolution,
//! preparation and limits); a stream ends with `[DONE]` after its final chunk, or with an error
//! event carrying OpenAI's error shape, never silently; dropping the connection drops the event
//! receiver, which frees the sequence in the engine.
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::common::{error_body, ApiError, HttpState};
use super::openai::{ChatRequest, CompletionRequest, Parsed};
use crate::api::inference::{engine_end, FinishGuard};
use crate::api::submit::{combine, resolve_model, start, UsageLabels};
use crate::engine::actor::{FinishInfo, StreamEvent};
use crate::engine::output::Collected;
use crate::engine::sequence::FinishReason;
use crate::model::sampling::TokenLogprob;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI's finish reasons: the end-of-sequence token and a stop string are both `stop`; the
/// token limit and the end of the context are both `length`.
fn finish_reason(r: &FinishReason) -> &'static str {
    match r.as_str() {
        "eos" | "stop" => "stop",
        _ => "length",
    }
}

fn usage(f: &FinishInfo) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.generated_tokens, "total_tokens": f.prompt_tokens + f.generated_tokens})
}

/// Token text for logprobs (the token decoded alone).
struct Tokens(Option<std::sync::Arc<tokenizers::Tokenizer>>);

impl Tokens {
    fn text(&self, id: u32) -> String {
        match &self.0 {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => format!("<{id}>"),
        }
    }

    fn chat_entry(&self, t: &TokenLogprob, top: &[TokenLogprob]) -> Value {
        let tok = self.text(t.id);
        json!({
            "token": tok, "logprob": t.logprob, "bytes": tok.as_bytes(),
            "top_logprobs": top.iter().map(|x| { let s = self.text(x.id); json!({"token": s, "logprob": x.logprob, "bytes": s.as_bytes()}) }).collect::<Vec<_>>(),
        })
    }

    /// Completions' legacy shape for a run of tokens starting at `offset` bytes into the text.
    fn completion_logprobs(&self, ids: &[(TokenLogprob, Vec<TokenLogprob>)], mut offset: usize) -> Value {
        let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for (t, top) in ids {
            let s = self.text(t.id);
            offsets.push(offset);
            offset += s.len();
            tokens.push(s);
            lps.push(t.logprob);
            tops.push(Value::Object(top.iter().map(|x| (self.text(x.id), json!(x.logprob))).collect()));
        }
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }
}

/// Resolves the model, submits, and answers whole or streamed.
async fn run(st: HttpState, p: Parsed, kind: Kind) -> Result<Response, ApiError> {
    let ready = st.serving.accepting()?;
    let resolved = resolve_model(ready, &p.model)?;
    let mut req = p.req;
    req.composition = combine(resolved.spec.clone(), std::mem::take(&mut req.composition))?;
    let labels = UsageLabels::new(ready, &resolved, &req.composition);
    let tokens = Tokens(ready.front.tokenizer.clone());
    let engine = Some(ready.engine.clone());
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, req.request_id);
    let rx = start(&st.serving, req).await?;
    let created = now();
    if !p.stream {
        let out = Collected::collect(rx).await.map_err(|e| ApiError(engine_end(engine.as_ref(), e).into()))?;
        let f = out.finish.clone().expect("collect() guarantees a finish");
        labels.record(&f);
        metrics::counter!("modserve_http_requests_total", "status" => "200").increment(1);
        let pairs: Vec<(TokenLogprob, Vec<TokenLogprob>)> = out
            .token_ids
            .iter()
            .zip(&out.logprobs)
            .zip(&out.top_logprobs)
            .map(|((&id, &logprob), top)| (TokenLogprob { id, logprob }, top.clone()))
            .collect();
        let body = match kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": p.model,
                "choices": [{"index": 0, "text": out.text, "finish_reason": finish_reason(&f.reason),
                             "logprobs": if p.logprobs { tokens.completion_logprobs(&pairs, 0) } else { Value::Null }}],
                "usage": usage(&f),
            }),
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": p.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": finish_reason(&f.reason),
                             "logprobs": if p.logprobs { json!({"content": pairs.iter().map(|(t, top)| tokens.chat_entry(t, top)).collect::<Vec<_>>()}) } else { Value::Null }}],
                "usage": usage(&f),
            }),
        };
        return Ok(Json(body).into_response());
    }

    // Streaming: one chunk per token, a final chunk with finish_reason, the usage chunk when
    // asked for, then [DONE].
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let (model, include_usage, want_logprobs) = (p.model, p.include_usage, p.logprobs);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(c.to_string())
    };
    let mut offset = 0usize;
    let mut first = true;
    let events = FinishGuard::new(rx, engine).flat_map(move |ev| {
        let mut out: Vec<Event> = Vec::new();
        match ev {
            Ok(StreamEvent::Token { token, top, text }) => {
                let lp = want_logprobs.then(|| match kind {
                    Kind::Chat => json!({"content": [tokens.chat_entry(&token, &top)]}),
                    Kind::Completion => tokens.completion_logprobs(&[(token, top.clone())], offset),
                });
                offset += text.len();
                let choice = match kind {
                    Kind::Chat => {
                        let delta = if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                        json!([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": null}])
                    }
                    Kind::Completion => json!([{"index": 0, "text": text, "logprobs": lp, "finish_reason": null}]),
                };
                first = false;
                out.push(chunk(choice, None));
            }
            Ok(StreamEvent::Finished(f)) => {
                labels.record(&f);
                metrics::counter!("modserve_http_requests_total", "status" => "200").increment(1);
                let reason = finish_reason(&f.reason);
                let choice = match kind {
                    Kind::Chat if first => {
                        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": reason}])
                    }
                    Kind::Chat => json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}]),
                    Kind::Completion => json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": reason}]),
                };
                out.push(chunk(choice, None));
                if include_usage {
                    out.push(chunk(json!([]), Some(usage(&f))));
                }
                out.push(Event::default().data("[DONE]"));
            }
            Err(e) => {
                let s: tonic::Status = e.into();
                let (code, _) = crate::api::status::http_status(s.code());
                metrics::counter!("modserve_http_requests_total", "status" => code.to_string()).increment(1);
                out.push(Event::default().data(error_body(&s).to_string()));
                out.push(Event::default().data("[DONE]"));
            }
        }
        futures_util::stream::iter(out.into_iter().map(Ok::<_, Infallible>))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// Reads a JSON body with OpenAI-shaped errors for malformed input.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| super::common::bad_request("invalid_argument", format!("request body: {e}")))
}

pub async fn completions(State(st): State<HttpState>, bytes: axum::body::Bytes) -> Response {
    let r = async {
        let p = body::<CompletionRequest>(&bytes)?.parse()?;
        run(st, p, Kind::Completion).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat_completions(State(st): State<HttpState>, bytes: axum::body::Bytes) -> Response {
    let r = async {
        let p = body::<ChatRequest>(&bytes)?.parse()?;
        run(st, p, Kind::Chat).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}
