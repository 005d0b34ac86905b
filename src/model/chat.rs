//! Chat templates: renders a conversation into the prompt string a chat model was trained on,
//! using the model's own Jinja template (GGUF `tokenizer.chat_template` or HF
//! `tokenizer_config.json`).
//!
//! Invariants:
//! - The environment mirrors transformers' `apply_chat_template`: `trim_blocks` and
//!   `lstrip_blocks` on, trailing newline dropped, lenient undefined, `loop_controls`, Python
//!   string/dict methods via `minijinja_contrib::pycompat`, and a `raise_exception(msg)` function.
//! - The context holds `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and `tools`
//!   / `documents` set to `none` (as transformers passes them when unused).
//! - A template is parsed once at construction; `render` never re-parses and is `&self`, so a
//!   `ChatTemplate` can be shared across threads.
use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// Name under which the template is stored in its private environment.
const TEMPLATE_NAME: &str = "chat";
/// GGUF metadata key of the chat template.
pub const GGUF_CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// Rendering failed (undefined function, type error, or the template's own
    /// `raise_exception`, whose message is included).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// GGUF metadata holds a template or special-token entry of the wrong type.
    #[error("GGUF metadata `{key}`: {reason}")]
    BadMetadata { key: String, reason: String },
}

impl ChatError {
    /// Stable machine-readable code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Syntax(_) => "chat.syntax",
            Self::Render(_) => "chat.render",
            Self::BadMetadata { .. } => "chat.bad_metadata",
        }
    }
}

/// One chat turn. Field names are those the templates index (`message['role']`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template plus the special-token strings passed to it.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

/// The error and its chain of causes as one line (minijinja keeps details in `source()`).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl ChatTemplate {
    /// Compiles `template` with empty `bos_token` / `eos_token` strings.
    pub fn new(template: &str) -> Result<Self, ChatError> {
        Self::with_special_tokens(template, "", "")
    }

    /// Compiles `template`; `bos_token` / `eos_token` are exposed to it under those names.
    pub fn with_special_tokens(template: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, template.to_string()).map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), with BOS/EOS strings looked up
    /// from `tokenizer.ggml.tokens` by `tokenizer.ggml.{bos,eos}_token_id` (empty if unknown).
    /// `Ok(None)` when the file has no template.
    pub fn from_gguf(content: &Content) -> Result<Option<Self>, ChatError> {
        let template = match content.metadata.get(GGUF_CHAT_TEMPLATE_KEY) {
            None => return Ok(None),
            Some(Value::String(s)) => s,
            Some(_) => return Err(ChatError::BadMetadata { key: GGUF_CHAT_TEMPLATE_KEY.into(), reason: "expected a string".into() }),
        };
        let tokens = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.as_slice(),
            _ => &[],
        };
        let token = |key: &str| -> String {
            let id = content.metadata.get(key).and_then(|v| v.to_u32().ok()).map(|i| i as usize);
            match id.and_then(|i| tokens.get(i)) {
                Some(Value::String(s)) => s.clone(),
                _ => String::new(),
            }
        };
        let (bos, eos) = (token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"));
        Self::with_special_tokens(template, &bos, &eos).map(Some)
    }

    /// The `bos_token` string passed to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` string passed to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages`; with `add_generation_prompt` the output ends with the header that
    /// opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let tpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatError::Render(describe(&e)))?;
        tpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => (),
            documents => (),
        })
        .map_err(|e| ChatError::Render(describe(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as stored in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2).expect("compile");
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "U")], false).expect("render");
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // Jinja2 with trim_blocks + lstrip_blocks: block tags eat their indentation and newline.
        let t = ChatTemplate::new("{{ bos_token }}\n  {% for m in messages %}\n[{{ m.role }}]\n  {% endfor %}\n").expect("compile");
        let t = ChatTemplate { bos_token: "<s>".into(), ..t };
        assert_eq!(t.render(&[ChatMessage::new("a", ""), ChatMessage::new("b", "")], false).expect("r"), "<s>\n[a]\n[b]\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user','assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip().upper() }}{% endfor %}{% if tools is none %}!{% endif %}",
        )
        .expect("compile");
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], false).expect("render"), "HI!");
        let err = t.render(&[ChatMessage::new("tool", "x")], false).expect_err("must raise");
        assert_eq!(err.code(), "chat.render");
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}").expect_err("unclosed for");
        assert_eq!(err.code(), "chat.syntax");
    }

    #[test]
    fn message_serde_shape() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"user","content":"x"}"#).expect("json");
        assert_eq!(m, ChatMessage::new("user", "x"));
    }
}
