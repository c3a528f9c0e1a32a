//! `zmlx validate`: greedy decode unpatched vs patched on the same backend (or against the
//! CPU reference with `--reference cpu`): identical tokens x/N, median tok/s, speedup.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use zmlx_models::{generate, Decoder, ModelFolder, SamplingOptions};

use super::engine::{self, EngineArgs, PatchArgs};
use super::generate::SamplingArgs;
use super::{parse_token_list, Device};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub patch: PatchArgs,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Timed runs of each side (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Prompt text (chat template applied); default: a fixed prompt, or random ids without a tokenizer.
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub prompt_tokens: Option<String>,
    /// Compare against the unpatched CPU reference instead of unpatched on the same device:
    /// `cpu` is MLX's CPU arithmetic (bf16 accumulation in quantized matmuls, as mlx-lm on
    /// the CPU); `cpu-exact` accumulates quantized matmuls exactly, as a GPU does in f32.
    #[arg(long, value_parser = ["cpu", "cpu-exact"])]
    pub reference: Option<String>,
    /// Decode all --max-tokens tokens even past an end-of-sequence token (a longer comparison
    /// on models whose greedy continuation ends early).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Greedy by default; with --temp both sides sample with the same seed, so identical
    /// logits must give identical tokens.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub const DEFAULT_PROMPT: &str = "Explain how a mixture-of-experts language model decodes one token, step by step.";

/// The prompt ids for a model: given ids, given text, the default text, or fixed random ids.
pub fn prompt_ids(folder: &ModelFolder, text: Option<&str>, ids: Option<&str>, random_len: usize) -> Result<Vec<u32>> {
    if let Some(ids) = ids {
        return parse_token_list(ids);
    }
    match (&folder.tokenizer, text) {
        (Some(tok), t) => Ok(tok.encode_prompt(t.unwrap_or(DEFAULT_PROMPT), true)?),
        (None, Some(_)) => bail!("{}: no tokenizer.json, so --prompt cannot be used; give --prompt-tokens", folder.path.display()),
        (None, None) => {
            let vocab = folder.config.raw.get("vocab_size").and_then(|v| v.as_u64()).context("config.json: missing vocab_size")?;
            let mut s = 0x2545_F491_4F6C_DD1Du64;
            Ok((0..random_len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % vocab) as u32
                })
                .collect())
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

/// Decode `runs` times (greedy, or sampled with `sampling`'s seed); returns the tokens of the
/// first run and the tok/s of each.
fn decode(d: &mut dyn Decoder, prompt: &[u32], max_tokens: usize, runs: usize, eos: &[u32], sampling: &SamplingOptions) -> Result<(Vec<u32>, Vec<f64>, bool)> {
    let mut first = None;
    let mut tps = Vec::new();
    let mut stable = true;
    // One warm-up run (kernel loading, graph capture).
    d.reset();
    generate(d, prompt, max_tokens.min(4), sampling.clone(), eos, |_| {})?;
    for _ in 0..runs.max(1) {
        d.reset();
        let (tokens, stats) = generate(d, prompt, max_tokens, sampling.clone(), eos, |_| {})?;
        tps.push(stats.generation_tps);
        match &first {
            None => first = Some(tokens),
            Some(f) => stable &= *f == tokens,
        }
    }
    Ok((first.unwrap_or_default(), tps, stable))
}

/// Where the decoder runs prompt steps concurrently: whether the logits after `prompt` equal
/// the one-at-a-time prefill's bit for bit, and the prompt tok/s of both (second runs, after
/// graph capture).
fn check_prefill(d: &mut dyn Decoder, prompt: &[u32]) -> Result<Option<(bool, f64, f64)>> {
    let lanes = d.prefill_lanes();
    if lanes < 2 || prompt.len() < 3 {
        return Ok(None);
    }
    let timed = |d: &mut dyn Decoder| -> Result<(Vec<u32>, f64)> {
        let mut out = (Vec::new(), 0.0);
        for _ in 0..2 {
            d.reset();
            let t = std::time::Instant::now();
            let logits = d.forward(prompt)?;
            out = (logits.iter().map(|x| x.to_bits()).collect(), prompt.len() as f64 / t.elapsed().as_secs_f64());
        }
        Ok(out)
    };
    let (concurrent, tps_c) = timed(d)?;
    d.set_prefill_lanes(1);
    let serial = timed(d);
    d.set_prefill_lanes(lanes);
    let (serial, tps_s) = serial?;
    Ok(Some((concurrent == serial, tps_c, tps_s)))
}

fn logits_rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn run(args: Args) -> Result<ExitCode> {
    let opts = args.patch.options()?;
    let sampling = args.sampling.options()?;
    let mut folder = ModelFolder::open(&args.engine.model)?;
    let prompt = prompt_ids(&folder, args.prompt.as_deref(), args.prompt_tokens.as_deref(), 16)?;
    let eos = if args.ignore_eos { Vec::new() } else { folder.eos_token_ids() };
    let tokenizer = folder.tokenizer.take();
    let max_len = prompt.len() + args.max_tokens + 8;
    let mut eng = engine::open(folder, &args.engine, max_len)?;

    // Baseline: the unpatched path on this device, or the CPU reference.
    let (base_tokens, base_tps, base_logits, base_launches, base_name) = if args.reference.is_some() {
        let mut cpu_args = args.engine.clone();
        cpu_args.device = Device::Cpu;
        zmlx_core::quant::set_exact_accumulation(args.reference.as_deref() == Some("cpu-exact"));
        let mut cpu = engine::open(ModelFolder::open(&args.engine.model)?, &cpu_args, max_len)?;
        cpu.decoder.patch(&[])?;
        let (t, tps, _) = decode(cpu.decoder.as_mut(), &prompt, args.max_tokens, args.runs, &eos, &sampling)?;
        cpu.decoder.reset();
        let logits = cpu.decoder.forward(&prompt)?;
        zmlx_core::quant::set_exact_accumulation(false);
        (t, tps, Some(logits), None, format!("{} reference", args.reference.as_deref().unwrap_or("cpu")))
    } else {
        eng.decoder.patch(&[])?;
        let (t, tps, _) = decode(eng.decoder.as_mut(), &prompt, args.max_tokens, args.runs, &eos, &sampling)?;
        (t, tps, None, eng.decoder.launches_per_token(), format!("unpatched {}", eng.device_name))
    };

    let report = if args.reference.is_some() && opts.no_patch {
        eng.decoder.patch(&[])?
    } else if args.patch.smart {
        let (kept, rows, base) = engine::smart_patch(&mut eng, &opts, &prompt, 32.min(args.max_tokens), 3, 0.02)?;
        engine::print_smart_table(&rows, base);
        eng.decoder.patch(&kept)?
    } else {
        engine::apply_patches(&mut eng, &opts)?
    };
    let (tokens, tps, stable) = decode(eng.decoder.as_mut(), &prompt, args.max_tokens, args.runs, &eos, &sampling)?;
    let logits_err = match &base_logits {
        Some(b) => {
            eng.decoder.reset();
            Some(logits_rel_err(b, &eng.decoder.forward(&prompt)?))
        }
        None => None,
    };
    let prefill = check_prefill(eng.decoder.as_mut(), &prompt)?;
    let identical = base_tokens.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
    let total = base_tokens.len().max(tokens.len());
    let (b, p) = (median(base_tps), median(tps));
    let speedup = if b > 0.0 { p / b } else { 0.0 };
    let ok = identical == total && stable && prefill.is_none_or(|p| p.0);
    let patterns = report.patterns();

    println!("{report}");
    println!("model: {} · device: {} · baseline: {base_name}", args.engine.model, eng.device_name);
    let how = if sampling.temp > 0.0 {
        format!(", sampled (temp {} top-p {} min-p {} top-k {} seed {})", sampling.temp, sampling.top_p, sampling.min_p, sampling.top_k, sampling.seed)
    } else {
        ", greedy".to_string()
    };
    println!("prompt: {} tokens · decode: {} tokens × {} runs{how}", prompt.len(), args.max_tokens, args.runs);
    println!("fidelity: {identical}/{total} identical tokens{}", if stable { "" } else { " (patched runs disagree with each other!)" });
    if let Some(e) = logits_err {
        println!("logits vs cpu: relative error {e:.2e}");
    }
    if let Some((same, c, s1)) = prefill {
        let verdict = if same { "bit-identical to" } else { "DIFFERENT from" };
        println!("prefill: concurrent prompt steps {verdict} one at a time ({} tokens: {c:.1} vs {s1:.1} tok/s)", prompt.len());
    }
    if let Some(t) = &tokenizer {
        if identical < total {
            println!("baseline: {:?}\npatched:  {:?}", t.decode(&base_tokens), t.decode(&tokens));
        }
    }
    if total < 2 {
        // generate() times decode steps only: none ran
        println!("tok/s: n/a (greedy decode hit end-of-sequence after {total} token; --ignore-eos decodes all {})", args.max_tokens);
    } else {
        if total < args.max_tokens {
            println!("stopped at end-of-sequence after {total} of {} tokens (--ignore-eos decodes all)", args.max_tokens);
        }
        println!("baseline {b:.1} tok/s · patched {p:.1} tok/s · speedup {speedup:.2}x");
    }
    if let (Some(lb), Some(lp)) = (base_launches, eng.decoder.launches_per_token()) {
        println!("launches per token: {lb} → {lp}");
    }
    if args.json {
        println!(
            "{}",
            json!({
                "fidelity": {"identical": identical, "total": total, "stable": stable},
                "baseline_tps": b, "patched_tps": p, "speedup": speedup,
                "patched_modules": report.total(), "patterns": patterns, "report": report.to_string(),
                "device": eng.device_name, "baseline": base_name,
                "launches_per_token": {"baseline": base_launches, "patched": eng.decoder.launches_per_token()},
                "logits_rel_err": logits_err,
                "prefill": prefill.map(|(same, c, s1)| json!({"bitwise_equal": same, "concurrent_tps": c, "serial_tps": s1})),
                "baseline_tokens": base_tokens, "patched_tokens": tokens,
                "sampling": {"temp": sampling.temp, "top_p": sampling.top_p, "min_p": sampling.min_p, "top_k": sampling.top_k, "seed": sampling.seed},
            })
        );
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
