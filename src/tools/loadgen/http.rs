//! The load generator's HTTP transport (`--protocol http`): sends each mix request to the OpenAI
//! API of a server started with `--http-listen` (`/v1/completions` for text and token-id prompts,
//! `/v1/chat/completions` for `chat_user`), streamed as server-sent events or whole, and measures
//! it as the gRPC transport does.
//!
//! Invariants: the request is the same generation as its gRPC form (the composition goes in the
//! `modserve` vendor extension with `model: base`; sampling fields map one to one); one SSE chunk
//! that carries text is one token (the server sends one chunk per token), and the token count of a
//! finished request is the server's `usage.completion_tokens`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};

use super::report::Measured;
use crate::pb;

/// A pooled HTTP/1.1 client for one target.
#[derive(Clone)]
pub struct HttpTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl HttpTarget {
    pub fn new(base: &str, concurrency: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(concurrency).build(connector);
        Self { client, base: base.trim_end_matches('/').to_string() }
    }
}

/// The OpenAI body (and path) of a gRPC request.
pub fn openai_body(r: &pb::GenerateRequest, stream: bool) -> (&'static str, Value) {
    use pb::generate_request::Prompt;
    let mut ext = json!({
        "deltas": r.deltas.iter().map(|d| json!({"module_id": d.module_id, "scale": if d.scale == 0.0 && !d.scale_is_set { 1.0 } else { d.scale }})).collect::<Vec<_>>(),
        "min_tokens": r.min_new_tokens,
    });
    if r.top_k > 0 {
        ext["top_k"] = json!(r.top_k);
    }
    if let Some(route) = &r.route {
        ext["route"] = match &route.routing {
            Some(pb::poly_route::Routing::TaskId(t)) => json!({"inventory_id": route.inventory_id, "task_id": t}),
            Some(pb::poly_route::Routing::Weights(w)) => json!({"inventory_id": route.inventory_id, "weights": w.values}),
            None => json!({"inventory_id": route.inventory_id}),
        };
    }
    let mut body = json!({
        "model": if r.model.is_empty() { "base" } else { r.model.as_str() },
        "max_tokens": if r.max_new_tokens == 0 { 64 } else { r.max_new_tokens },
        "temperature": r.temperature,
        "top_p": if r.top_p == 0.0 { 1.0 } else { r.top_p },
        "seed": r.seed as i64,
        "modserve": ext,
    });
    if !r.stop.is_empty() {
        body["stop"] = json!(r.stop);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let chat = matches!(r.prompt, Some(Prompt::ChatUser(_)) | Some(Prompt::Chat(_)));
    if r.top_logprobs > 0 {
        if chat {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(r.top_logprobs);
        } else {
            body["logprobs"] = json!(r.top_logprobs);
        }
    }
    match &r.prompt {
        Some(Prompt::Text(t)) => body["prompt"] = json!(t),
        Some(Prompt::TokenIds(ids)) => body["prompt"] = json!(ids.ids),
        Some(Prompt::ChatUser(u)) => body["messages"] = json!([{"role": "user", "content": u}]),
        Some(Prompt::Chat(c)) => {
            body["messages"] = json!(c.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>())
        }
        None => {}
    }
    (if chat { "/v1/chat/completions" } else { "/v1/completions" }, body)
}

/// gRPC-style name of an HTTP error status, so reports read the same for both protocols.
fn code_of(status: u16) -> String {
    match status {
        400 => "INVALID_ARGUMENT".into(),
        401 => "UNAUTHENTICATED".into(),
        403 => "PERMISSION_DENIED".into(),
        404 => "NOT_FOUND".into(),
        409 => "ABORTED".into(),
        422 => "FAILED_PRECONDITION".into(),
        429 => "RESOURCE_EXHAUSTED".into(),
        500 => "INTERNAL".into(),
        503 => "UNAVAILABLE".into(),
        504 => "DEADLINE_EXCEEDED".into(),
        s => format!("HTTP_{s}"),
    }
}

/// The text of a chunk's first choice (completion `text` or chat `delta.content`).
fn chunk_text(c: &Value) -> Option<&str> {
    let choice = c["choices"].get(0)?;
    choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str())
}

/// Sends one request and measures it.
pub async fn http_request(t: &HttpTarget, r: pb::GenerateRequest, stream: bool, started: Instant, live: &AtomicU64) -> Measured {
    let (path, body) = openai_body(&r, stream);
    let req = hyper::Request::post(format!("{}{path}", t.base))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())));
    let req = match req {
        Ok(r) => r,
        Err(e) => return (Err(("INVALID_ARGUMENT".into(), e.to_string())), None, vec![], 0),
    };
    let resp = match t.client.request(req).await {
        Ok(r) => r,
        Err(e) => return (Err(("UNAVAILABLE".into(), e.to_string())), None, vec![], 0),
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let msg = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| v["error"]["message"].as_str().map(str::to_string));
        return (Err((code_of(status), msg.unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()))), None, vec![], 0);
    }
    if !stream {
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return (Err(("UNAVAILABLE".into(), e.to_string())), None, vec![], 0),
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        live.fetch_add(n, Ordering::Relaxed);
        return (Ok(()), Some(started.elapsed()), vec![], n);
    }
    let (mut ttft, mut itl, mut tokens, mut last) = (None, Vec::new(), 0u64, None::<Instant>);
    let (mut finished, mut usage, mut done) = (false, None, false);
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return (Err(("UNAVAILABLE".into(), e.to_string())), ttft, itl, tokens),
        };
        let Some(data) = frame.data_ref() else { continue };
        buf.extend_from_slice(data);
        // Events end with a blank line.
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(payload) = line.strip_prefix("data: ") else { continue };
                if payload == "[DONE]" {
                    done = true;
                    continue;
                }
                let c: Value = serde_json::from_str(payload).unwrap_or_default();
                if let Some(err) = c.get("error") {
                    let code = err["code"].as_str().unwrap_or("error").to_string();
                    return (Err((code, err["message"].as_str().unwrap_or_default().to_string())), ttft, itl, tokens);
                }
                if chunk_text(&c).is_some_and(|t| !t.is_empty()) {
                    let now = Instant::now();
                    match last {
                        None => ttft = Some(now - started),
                        Some(prev) => itl.push(now - prev),
                    }
                    last = Some(now);
                    tokens += 1;
                    live.fetch_add(1, Ordering::Relaxed);
                }
                if c["choices"].get(0).is_some_and(|ch| ch["finish_reason"].is_string()) {
                    finished = true;
                }
                if let Some(n) = c["usage"]["completion_tokens"].as_u64() {
                    usage = Some(n);
                }
            }
        }
    }
    if !finished || !done {
        return (Err(("INCOMPLETE".into(), "stream ended without a finish_reason and [DONE]".into())), ttft, itl, tokens);
    }
    (Ok(()), ttft, itl, usage.filter(|n| *n > 0).unwrap_or(tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_map_to_openai_bodies() {
        let r = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2] })),
            max_new_tokens: 8,
            min_new_tokens: 8,
            deltas: vec![pb::DeltaRef { module_id: "l".into(), scale: 0.0, scale_is_set: true }],
            route: Some(pb::PolyRoute { inventory_id: "p".into(), routing: Some(pb::poly_route::Routing::TaskId(2)) }),
            top_logprobs: 3,
            ..Default::default()
        };
        let (path, b) = openai_body(&r, true);
        assert_eq!(path, "/v1/completions");
        assert_eq!(b["prompt"], json!([1, 2]));
        assert_eq!(b["max_tokens"], 8);
        assert_eq!(b["modserve"]["min_tokens"], 8);
        assert_eq!(b["modserve"]["deltas"][0], json!({"module_id": "l", "scale": 0.0}));
        assert_eq!(b["modserve"]["route"], json!({"inventory_id": "p", "task_id": 2}));
        assert_eq!((b["logprobs"].clone(), b["stream"].clone()), (json!(3), json!(true)));
        let chat = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::ChatUser("hi".into())),
            top_logprobs: 2,
            ..Default::default()
        };
        let (path, b) = openai_body(&chat, false);
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(b["messages"][0]["content"], "hi");
        assert_eq!((b["logprobs"].clone(), b["top_logprobs"].clone()), (json!(true), json!(2)));
    }
}
