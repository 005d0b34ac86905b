//! Aggregating a request's event stream into one result (unary gRPC, the CLI, tests).
use tokio::sync::mpsc;

use super::actor::{EventResult, FinishInfo, StreamEvent};
use super::error::EngineError;
use crate::model::sampling::TokenLogprob;

/// A whole generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
    pub text: String,
    pub finish: Option<FinishInfo>,
}

impl Collected {
    pub fn push(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Token { token, top, text } => {
                self.token_ids.push(token.id);
                self.logprobs.push(token.logprob);
                self.top_logprobs.push(top);
                self.text.push_str(&text);
            }
            StreamEvent::Finished(f) => self.finish = Some(f),
        }
    }

    fn done(self) -> Result<Self, EngineError> {
        if self.finish.is_none() {
            return Err(EngineError::SlowClient);
        }
        Ok(self)
    }

    /// Waits for the whole stream (async).
    pub async fn collect(mut rx: mpsc::Receiver<EventResult>) -> Result<Self, EngineError> {
        let mut c = Self::default();
        while let Some(ev) = rx.recv().await {
            c.push(ev?);
        }
        c.done()
    }

    /// Waits for the whole stream (blocking; not on an async runtime thread).
    pub fn collect_blocking(mut rx: mpsc::Receiver<EventResult>) -> Result<Self, EngineError> {
        let mut c = Self::default();
        while let Some(ev) = rx.blocking_recv() {
            c.push(ev?);
        }
        c.done()
    }
}
