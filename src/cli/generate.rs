//! `zmlx generate`: prompt → tokens, streamed, with mlx_lm.generate-like stats.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use zmlx_models::{generate, ModelFolder, SamplingOptions};

use super::engine::{self, EngineArgs, PatchArgs};
use super::parse_token_list;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub patch: PatchArgs,
    /// Prompt text (the chat template is applied, as mlx_lm.generate does).
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    /// Prompt as token ids, e.g. 3,141,59 (no template).
    #[arg(long)]
    pub prompt_tokens: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Use the raw prompt, without the chat template.
    #[arg(long)]
    pub ignore_chat_template: bool,
    /// Generate max-tokens tokens even past an EOS id (timing runs).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object as the last line of stdout (tokens, text, stats).
    #[arg(long)]
    pub json: bool,
}

/// How tokens are chosen (`zmlx generate`, `zmlx validate`, `zmlx bench`).
#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy. Sampling applies mlx-lm's filters (top-p, min-p,
    /// then top-k) and draws on the device under --device cuda.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus: keep the most likely tokens whose probability (at temperature 1) reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Min-p: keep the tokens at least MIN_P times as likely as the best one (0: off). Applied
    /// between top-p and top-k, as mlx-lm.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Keep the K most likely tokens (0: all; ties at the K-th value keep the lowest ids).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the draws: the same seed, prompt and model give the same tokens (CPU or GPU).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> Result<SamplingOptions> {
        if !(self.temp >= 0.0 && self.temp.is_finite()) {
            bail!("--temp must be a finite number >= 0, got {}", self.temp);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("--min-p must be in [0, 1], got {}", self.min_p);
        }
        Ok(SamplingOptions { temp: self.temp, top_p: self.top_p, top_k: self.top_k, min_p: self.min_p, seed: self.seed })
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let sampling = args.sampling.options()?;
    let mut model = ModelFolder::open(&args.engine.model)?;
    let prompt = match (&args.prompt, &args.prompt_tokens) {
        (_, Some(ids)) => parse_token_list(ids)?,
        (Some(text), None) => {
            let tok = model.tokenizer.as_ref().with_context(|| format!("{}: no tokenizer.json, so --prompt cannot be used; give --prompt-tokens", model.path.display()))?;
            tok.encode_prompt(text, !args.ignore_chat_template)?
        }
        (None, None) => bail!("give --prompt TEXT or --prompt-tokens IDS"),
    };
    // Check the ids before loading weights, so bad input fails fast with one line.
    if let Some(vocab) = model.config.raw.get("vocab_size").and_then(|v| v.as_u64()) {
        if let Some(&bad) = prompt.iter().find(|&&t| t as u64 >= vocab) {
            bail!("prompt token id {bad} is out of range (vocab size {vocab})");
        }
    }
    let eos = if args.ignore_eos { Vec::new() } else { model.eos_token_ids() };
    let tokenizer = model.tokenizer.take();
    let mut engine = engine::open(model, &args.engine, prompt.len() + args.max_tokens)?;
    let opts = args.patch.options()?;
    let report = if args.patch.smart {
        let (kept, rows, base) = engine::smart_patch(&mut engine, &opts, &prompt, 32, 3, 0.02)?;
        engine::print_smart_table(&rows, base);
        engine.decoder.patch(&kept)?
    } else {
        engine::apply_patches(&mut engine, &opts)?
    };
    eprintln!("{report}");
    let tokenizer = tokenizer.as_ref();
    let mut generated = Vec::new();
    let mut printed = String::new();
    let stream = !args.json && tokenizer.is_some();
    if stream {
        println!("==========");
    }
    let (tokens, stats) = generate(engine.decoder.as_mut(), &prompt, args.max_tokens, sampling, &eos, |t| {
        if let (true, Some(tok)) = (stream, tokenizer) {
            generated.push(t);
            // Print the new suffix once it no longer ends in a partial UTF-8 sequence.
            let text = tok.decode(&generated);
            if !text.ends_with('\u{FFFD}') && text.len() > printed.len() && text.starts_with(&printed) {
                print!("{}", &text[printed.len()..]);
                std::io::stdout().flush().ok();
                printed = text;
            }
        }
    })?;
    let text = tokenizer.map(|t| t.decode(&tokens));
    if args.json {
        let mut obj = serde_json::json!({
            "tokens": tokens,
            "prompt_tokens": stats.prompt_tokens,
            "prompt_ids": prompt,
            "prompt_tps": stats.prompt_tps,
            "generation_tokens": stats.generation_tokens,
            "generation_tps": stats.generation_tps,
            "peak_memory_bytes": stats.peak_memory_bytes,
            "finish_reason": stats.finish_reason,
            "device": engine.device_name,
            "patch": report.to_string(),
        });
        if let Some(text) = text {
            obj["text"] = text.into();
        }
        println!("{obj}");
    } else {
        if stream {
            if let Some(text) = &text {
                print!("{}", text.get(printed.len()..).unwrap_or(""));
            }
            println!("\n==========");
        } else {
            println!("{}", tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        }
        println!("Prompt: {} tokens, {:.3} tokens-per-sec", stats.prompt_tokens, stats.prompt_tps);
        println!("Generation: {} tokens, {:.3} tokens-per-sec", stats.generation_tokens, stats.generation_tps);
        println!("Peak memory: {:.3} GB", stats.peak_memory_bytes as f64 / 1e9);
    }
    Ok(ExitCode::SUCCESS)
}
