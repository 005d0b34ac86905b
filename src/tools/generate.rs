//! `modserve generate`: one generation in-process, through the same engine the server runs
//! (request preparation, the engine thread, the event stream). Prints the text, or with `--json`:
//! `{"prompt_ids":[..],"token_ids":[..],"text":"..","finish_reason":"..","top_logprobs":[[{"id":..,"logprob":..},..],..],
//! "timings":{"ttft_s":..,"decode_s":..,"decode_tokens_per_s":..}}`.
use std::sync::Arc;

use clap::Args;

use crate::adapters::composition::{parse_delta_ref, parse_route, CompositionSpec};
use crate::adapters::store::AdapterStore;
use crate::config::{AdapterArgs, ModelArgs};
use crate::engine::actor::{spawn_engine, EngineConfig};
use crate::engine::output::Collected;
use crate::engine::prepare::{EngineRequest, PromptInput, TextFrontEnd};
use crate::engine::sequence::GenerateSpec;
use crate::model::load::LoadedModel;
use crate::model::sampling::{SamplingParams, TokenLogprob};

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids", "chat"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Add a module's delta: `ID[@SCALE]` (ID is a module folder or file under --adapter-root;
    /// its kind is detected; SCALE defaults to 1, may be negative). Repeatable.
    #[arg(long = "delta", value_name = "ID[@SCALE]")]
    pub deltas: Vec<String>,
    /// Poly routing: `INVENTORY:TASK` (task id) or `INVENTORY:W1,W2,...` (explicit skill weights).
    #[arg(long, value_name = "ID:TASK")]
    pub route: Option<String>,
    /// Raw prompt text (no template).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Suppress end-of-sequence tokens until this many tokens were generated.
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = disabled.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Report the K most likely tokens at every step.
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Wall-clock timings of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Request start to the first generated token (prefill + first step).
    pub ttft_s: f64,
    /// First generated token to the last.
    pub decode_s: f64,
    /// Tokens after the first, per second of `decode_s`.
    pub decode_tokens_per_s: f64,
}

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
    pub timings: Timings,
}

/// Builds the engine request for the command-line arguments.
pub fn request_from_args(args: &GenerateArgs) -> anyhow::Result<EngineRequest> {
    let prompt = match (&args.prompt, &args.prompt_ids, &args.chat) {
        (Some(p), _, _) => PromptInput::Text(p.clone()),
        (None, Some(ids), _) => PromptInput::TokenIds(ids.clone()),
        (None, None, Some(c)) => PromptInput::ChatUser(c.clone()),
        (None, None, None) => anyhow::bail!("one of --prompt, --prompt-ids, --chat is required"),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        top_logprobs: args.top_logprobs,
    };
    sampling.validate()?;
    let composition = CompositionSpec {
        deltas: args.deltas.iter().map(|d| parse_delta_ref(d)).collect::<Result<_, _>>()?,
        route: args.route.as_deref().map(parse_route).transpose()?,
    };
    if !composition.is_empty() && args.adapters.adapter_root.is_none() {
        anyhow::bail!("--delta / --route need --adapter-root");
    }
    Ok(EngineRequest {
        prompt,
        spec: GenerateSpec {
            prompt_ids: Vec::new(),
            max_new_tokens: args.max_new_tokens,
            min_new_tokens: args.min_new_tokens,
            stop: args.stop.clone(),
            sampling,
        },
        composition,
        deadline: None,
        request_id: "cli".into(),
    })
}

/// Runs the generation described by `args` on `model`.
pub fn run(model: &LoadedModel, store: Option<&AdapterStore>, args: &GenerateArgs) -> anyhow::Result<GenerateOutput> {
    let req = request_from_args(args)?;
    let front = Arc::new(TextFrontEnd::from_model(model));
    let prepared = front.prepare(store, req)?;
    let prompt_ids = prepared.spec.prompt_ids.clone();
    let cfg = EngineConfig { prefill_chunk: args.prefill_chunk, max_batch_tokens: args.prefill_chunk.max(1), ..Default::default() };
    let engine = spawn_engine(model.llama.clone(), front, cfg)?;
    let t0 = std::time::Instant::now();
    let out = Collected::collect_blocking(engine.submit(prepared)?)?;
    let total = t0.elapsed().as_secs_f64();
    let f = out.finish.clone().expect("collect() guarantees a finish");
    let decode_s = (total - f.ttft_s).max(0.0);
    Ok(GenerateOutput {
        prompt_ids,
        token_ids: out.token_ids,
        text: out.text,
        finish_reason: f.reason.as_str().to_string(),
        top_logprobs: out.top_logprobs,
        timings: Timings {
            ttft_s: f.ttft_s,
            decode_s,
            decode_tokens_per_s: if decode_s > 0.0 { f.generated_tokens.saturating_sub(1) as f64 / decode_s } else { 0.0 },
        },
    })
}
