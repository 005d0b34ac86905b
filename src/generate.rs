//! `modserve generate`: one generation in-process, through the same request path the server's
//! model thread uses. Prints the text, or with `--json` one object:
//! `{"prompt_ids":[..],"token_ids":[..],"text":"..","finish_reason":"..","top_logprobs":[[{"id":..,"logprob":..},..],..]}`.
use crate::adapters::store::{parse_delta_ref, parse_route, CompositionSpec};
use crate::config::GenerateArgs;
use crate::engine::sequence::GenerateSpec;
use crate::engine::worker::{generate_blocking, EngineContext, EngineRequest, PromptInput};
use crate::model::sampling::{SamplingParams, TokenLogprob};

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
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
    })
}

/// Runs the generation described by `args` in `ctx`.
pub fn run(ctx: &EngineContext, args: &GenerateArgs) -> anyhow::Result<GenerateOutput> {
    let req = request_from_args(args)?;
    let out = generate_blocking(ctx, req, args.prefill_chunk)?;
    Ok(GenerateOutput {
        prompt_ids: out.prompt_ids,
        token_ids: out.token_ids,
        text: out.text,
        finish_reason: out.finish_reason.to_string(),
        top_logprobs: out.top_logprobs,
    })
}
