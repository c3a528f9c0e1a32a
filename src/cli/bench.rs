//! `zmlx bench`: prompt lengths × generation lengths × runs (after a warm-up), medians,
//! one capsule JSON under benchmarks/capsules/; `zmlx bench report CAPSULE` prints it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use zmlx_models::{generate, ModelFolder, SamplingOptions};

use super::engine::{self, Engine, EngineArgs, PatchArgs};
use super::generate::SamplingArgs;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Print the tables of a capsule.
    Report { capsule: PathBuf },
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub engine: Option<EngineArgs>,
    /// Prompt lengths (tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub prompt_lens: Vec<usize>,
    /// Generation lengths (tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    pub gen_lens: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CUDA: measure with graphs, without, or both.
    #[arg(long, default_value = "both")]
    pub graph: GraphMode,
    /// Where the capsule goes.
    #[arg(long, default_value = "benchmarks/capsules")]
    pub out_dir: PathBuf,
    /// A name for the capsule file (default: model + time).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub patch: PatchArgs,
    /// Stress protocol: 5 prompt styles × --stress-lens × runs, unpatched vs patched, token
    /// fidelity per config.
    #[arg(long)]
    pub stress: bool,
    /// Generation lengths of the stress protocol.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048")]
    pub stress_lens: Vec<usize>,
    /// Record the experts each layer picks (ids and weights) over a decode, with the routing
    /// entropy per layer (CUDA).
    #[arg(long)]
    pub routing_stats: bool,
    /// Greedy by default; with --temp every run samples with the same seed.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The capsule's record of how tokens were chosen.
fn sampling_json(s: &SamplingOptions) -> serde_json::Value {
    if s.temp > 0.0 {
        json!({"temp": s.temp, "top_p": s.top_p, "min_p": s.min_p, "top_k": s.top_k, "seed": s.seed})
    } else {
        json!("greedy")
    }
}

/// The stress protocol's prompt styles.
pub const STRESS_PROMPTS: [(&str, &str); 5] = [
    ("english_technical", "Explain how paged attention manages the KV cache of a transformer during batched decoding, and why it reduces memory fragmentation."),
    ("chinese", "请详细解释混合专家模型（MoE）在推理时如何为每个词元选择专家，以及这对显存带宽有什么影响。"),
    ("code", "Write a Rust function that parses a safetensors header, validates every tensor's offsets, and returns a map from names to shapes."),
    ("math_reasoning", "A train leaves at 9:40 and travels 182 km at 78 km/h, then 95 km at 114 km/h. When does it arrive? Reason step by step."),
    ("creative", "Write a short story about a lighthouse keeper who discovers that the light has been signalling to something beneath the sea."),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphMode {
    On,
    Off,
    Both,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.action {
        Some(Action::Report { capsule }) => {
            let text = std::fs::read_to_string(&capsule).with_context(|| format!("{}: cannot read", capsule.display()))?;
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not a capsule (bad JSON)", capsule.display()))?;
            print!("{}", report(&v).with_context(|| format!("{}: not a zmlx bench capsule", capsule.display()))?);
            Ok(ExitCode::SUCCESS)
        }
        None => run_bench(args.run),
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn run_bench(args: RunArgs) -> Result<ExitCode> {
    if args.stress {
        return run_stress(args);
    }
    let Some(eargs) = args.engine.clone() else { bail!("give --model (or `zmlx bench report CAPSULE`)") };
    let opts = args.patch.options()?;
    let sampling = args.sampling.options()?;
    if args.runs == 0 || args.prompt_lens.iter().chain(&args.gen_lens).any(|&n| n == 0) {
        bail!("--runs, --prompt-lens and --gen-lens must be positive");
    }
    let modes: Vec<bool> = match (eargs.device, args.graph) {
        (super::Device::Cpu, _) => vec![false],
        (_, GraphMode::On) => vec![true],
        (_, GraphMode::Off) => vec![false],
        (_, GraphMode::Both) => vec![true, false],
    };
    let max_len = args.prompt_lens.iter().max().unwrap() + args.gen_lens.iter().max().unwrap();
    let vocab = ModelFolder::open(&eargs.model)?.config.raw.get("vocab_size").and_then(Value::as_u64).context("config.json: missing vocab_size")? as u32;
    let mut runs = Vec::new();
    let mut summary = Vec::new();
    let mut fidelity_identical = 0;
    let mut fidelity_total = 0;
    let mut device_name = String::new();
    let mut launches = None;
    let mut patch_report = String::new();
    let mut routing = Value::Null;
    let mut weight_bytes = None;
    let mut reference_tokens: std::collections::HashMap<(usize, usize), Vec<u32>> = Default::default();
    for &graph in &modes {
        let mut e = eargs.clone();
        e.no_graph = !graph;
        let t0 = Instant::now();
        let folder = ModelFolder::open(&e.model)?;
        let mut engine = engine::open(folder, &e, max_len)?;
        let report = engine::apply_patches(&mut engine, &opts)?;
        patch_report = report.to_string();
        let load_s = t0.elapsed().as_secs_f64();
        device_name = engine.device_name.clone();
        weight_bytes = engine.weight_bytes;
        eprintln!("loaded on {} in {load_s:.1}s (graph: {graph})", engine.device_name);
        for &pl in &args.prompt_lens {
            // A fixed pseudo-random prompt: the same ids for every run and mode.
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ pl as u64;
            let prompt: Vec<u32> = (0..pl)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % vocab as u64) as u32
                })
                .collect();
            for &gl in &args.gen_lens {
                // Warm-up (kernel loading, graph capture), not measured.
                engine.decoder.reset();
                generate(engine.decoder.as_mut(), &prompt, 4.min(gl), sampling.clone(), &[], |_| {})?;
                // launches of a decode step right after the prompt (the count is taken as issued)
                launches = launches.or(engine.decoder.launches_per_token());
                let (mut decode, mut prefill) = (Vec::new(), Vec::new());
                for r in 0..args.runs {
                    engine.decoder.reset();
                    let (tokens, stats) = generate(engine.decoder.as_mut(), &prompt, gl, sampling.clone(), &[], |_| {})?;
                    let same = match reference_tokens.get(&(pl, gl)) {
                        Some(t) => *t == tokens,
                        None => {
                            reference_tokens.insert((pl, gl), tokens.clone());
                            true
                        }
                    };
                    fidelity_total += 1;
                    fidelity_identical += same as usize;
                    decode.push(stats.generation_tps);
                    prefill.push(stats.prompt_tps);
                    runs.push(json!({"graph": graph, "prompt_len": pl, "gen_len": gl, "run": r,
                        "prompt_tps": stats.prompt_tps, "generation_tps": stats.generation_tps,
                        "generation_tokens": stats.generation_tokens, "identical_to_first": same,
                        "peak_memory_bytes": stats.peak_memory_bytes}));
                    eprintln!("graph={graph} prompt={pl} gen={gl} run={r}: {:.1} tok/s decode, {:.1} tok/s prefill", stats.generation_tps, stats.prompt_tps);
                }
                if args.routing_stats && routing.is_null() {
                    routing = routing_stats(&mut engine, &prompt, gl.min(256))?;
                }
                summary.push(json!({"graph": graph, "prompt_len": pl, "gen_len": gl,
                    "median_generation_tps": median(&mut decode), "median_prompt_tps": median(&mut prefill), "runs": args.runs,
                    "last_step_launches": engine.decoder.launches_per_token()}));
            }
        }
    }
    let folder = ModelFolder::open(&eargs.model)?;
    let mut capsule = capsule_header("zmlx-bench/1", &device_name);
    capsule.as_object_mut().unwrap().extend(json!({
        "model": {"path": eargs.model, "model_type": folder.config.model_type, "dummy_weights": eargs.dummy_weights,
                  "bits": eargs.bits, "group_size": eargs.group_size, "config": folder.config.raw},
        "settings": {"prompt_lens": args.prompt_lens, "gen_lens": args.gen_lens, "runs": args.runs, "warmup_runs": 1,
                     "graph_modes": modes, "sampling": sampling_json(&sampling), "launches_per_token": launches, "weight_bytes_on_device": weight_bytes, "patch": patch_report},
        "routing": routing,
        "fidelity": {"identical": fidelity_identical, "total": fidelity_total,
                     "what": "tokens of every run (greedy, or sampled with one seed) equal the first run of the same (prompt, gen) config, across graph modes"},
        "summary": summary,
        "runs": runs,
    }).as_object().unwrap().clone());
    let path = write_capsule(&args.out_dir, args.name.as_deref(), &eargs, "", &capsule)?;
    print!("{}", report(&capsule)?);
    println!("capsule: {}", path.display());
    Ok(if fidelity_identical == fidelity_total { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Write a capsule under `dir`, never overwriting one that exists.
fn write_capsule(dir: &std::path::Path, name: Option<&str>, e: &EngineArgs, kind: &str, capsule: &Value) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = name.map(String::from).unwrap_or_else(|| {
        let base = std::path::Path::new(&e.model).file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
        format!("{base}{kind}-{}-{}", if e.dummy_weights { "dummy" } else { "weights" }, capsule["created_unix"])
    });
    let mut path = dir.join(format!("{name}.json"));
    let mut i = 1;
    while path.exists() {
        path = dir.join(format!("{name}-{i}.json"));
        i += 1;
    }
    std::fs::write(&path, serde_json::to_string_pretty(capsule)?)?;
    Ok(path)
}

/// Greedy-decode `n` tokens one step at a time, reading each layer's routing after each step:
/// expert counts, weight sums and the routing entropy per layer.
fn routing_stats(engine: &mut Engine, prompt: &[u32], n: usize) -> Result<Value> {
    let d = engine.decoder.as_mut();
    d.reset();
    let mut counts: Vec<Vec<u64>> = Vec::new();
    let mut weights: Vec<Vec<f64>> = Vec::new();
    let mut next = d.forward_greedy(prompt)?;
    for step in 0..n {
        let Some(routing) = d.last_routing()? else { return Ok(json!({"unsupported": "this backend does not expose routing"})) };
        for (layer, (ids, ws)) in routing.iter().enumerate() {
            if counts.len() <= layer {
                counts.push(Vec::new());
                weights.push(Vec::new());
            }
            for (&e, &w) in ids.iter().zip(ws) {
                let e = e as usize;
                if counts[layer].len() <= e {
                    counts[layer].resize(e + 1, 0);
                    weights[layer].resize(e + 1, 0.0);
                }
                counts[layer][e] += 1;
                weights[layer][e] += w as f64;
            }
        }
        if step + 1 < n {
            next = d.forward_greedy(&[next])?;
        }
    }
    let layers: Vec<Value> = counts
        .iter()
        .zip(&weights)
        .enumerate()
        .filter(|(_, (c, _))| !c.is_empty())
        .map(|(i, (c, w))| {
            let total: u64 = c.iter().sum();
            let entropy: f64 = c.iter().filter(|&&x| x > 0).map(|&x| { let p = x as f64 / total as f64; -p * p.log2() }).sum();
            json!({"layer": i, "counts": c, "weight_sums": w, "entropy_bits": entropy, "experts_used": c.iter().filter(|&&x| x > 0).count()})
        })
        .collect();
    let mean_entropy = layers.iter().filter_map(|l| l["entropy_bits"].as_f64()).sum::<f64>() / layers.len().max(1) as f64;
    Ok(json!({"tokens": n, "mean_entropy_bits": mean_entropy, "layers": layers}))
}

/// The stress protocol: styles × lengths × runs, unpatched vs patched, in one capsule.
fn run_stress(args: RunArgs) -> Result<ExitCode> {
    let Some(eargs) = args.engine.clone() else { bail!("give --model") };
    let opts = args.patch.options()?;
    let sampling = args.sampling.options()?;
    let mut folder = ModelFolder::open(&eargs.model)?;
    let tokenizer = folder.tokenizer.take();
    let vocab = folder.config.raw.get("vocab_size").and_then(Value::as_u64).context("config.json: missing vocab_size")?;
    let prompts: Vec<(&str, Vec<u32>)> = STRESS_PROMPTS
        .iter()
        .enumerate()
        .map(|(i, (style, text))| -> Result<(&str, Vec<u32>)> {
            Ok((*style, match &tokenizer {
                Some(t) => t.encode_prompt(text, true)?,
                // No tokenizer (dummy weights from a bare config): a fixed id sequence per style.
                None => (0..48u64).map(|j| ((j * 2654435761 + i as u64 * 40503 + 7) % vocab) as u32).collect(),
            }))
        })
        .collect::<Result<_>>()?;
    let max_len = prompts.iter().map(|p| p.1.len()).max().unwrap_or(0) + args.stress_lens.iter().max().copied().unwrap_or(0) + 8;
    let mut engine = engine::open(folder, &eargs, max_len)?;
    let patterns = zmlx_models::patch::plan(&engine.model_type, engine.decoder.backend(), &opts);
    let mut rows = Vec::new();
    let (mut identical_configs, mut total_configs) = (0, 0);
    let mut report_line = String::new();
    for (style, prompt) in &prompts {
        for &len in &args.stress_lens {
            let mut side = |patched: bool| -> Result<(Vec<u32>, f64)> {
                let r = engine.decoder.patch(if patched { &patterns } else { &[] })?;
                if patched {
                    report_line = r.to_string();
                }
                generate(engine.decoder.as_mut(), prompt, 4, sampling.clone(), &[], |_| {})?;
                let mut tps = Vec::new();
                let mut first = None;
                for _ in 0..args.runs {
                    engine.decoder.reset();
                    let (t, st) = generate(engine.decoder.as_mut(), prompt, len, sampling.clone(), &[], |_| {})?;
                    tps.push(st.generation_tps);
                    first.get_or_insert(t);
                }
                Ok((first.unwrap_or_default(), median(&mut tps)))
            };
            let (base_t, base_tps) = side(false)?;
            let (pat_t, pat_tps) = side(true)?;
            let identical = base_t.iter().zip(&pat_t).take_while(|(a, b)| a == b).count();
            total_configs += 1;
            identical_configs += (identical == len) as usize;
            eprintln!("{style:<18} len {len:>5}: baseline {base_tps:.1} tok/s, patched {pat_tps:.1} tok/s, {:.2}x, identical {identical}/{len}", pat_tps / base_tps);
            rows.push(json!({"style": style, "gen_len": len, "prompt_len": prompt.len(), "baseline_tps": base_tps, "patched_tps": pat_tps,
                "speedup": pat_tps / base_tps, "identical": identical, "total": len}));
        }
    }
    let folder = ModelFolder::open(&eargs.model)?;
    let mut capsule = capsule_header("zmlx-stress/1", &engine.device_name);
    capsule.as_object_mut().unwrap().extend(json!({
        "model": {"path": eargs.model, "model_type": folder.config.model_type, "dummy_weights": eargs.dummy_weights, "config": folder.config.raw},
        "settings": {"styles": STRESS_PROMPTS.iter().map(|p| p.0).collect::<Vec<_>>(), "gen_lens": args.stress_lens, "runs": args.runs,
                     "prompt_source": if tokenizer.is_some() { "model tokenizer + chat template" } else { "fixed ids per style (no tokenizer)" },
                     "patch": report_line, "sampling": sampling_json(&sampling)},
        "fidelity": {"identical_configs": identical_configs, "total_configs": total_configs},
        "stress": rows,
    }).as_object().unwrap().clone());
    let path = write_capsule(&args.out_dir, args.name.as_deref(), &eargs, "-stress", &capsule)?;
    print!("{}", report(&capsule)?);
    println!("capsule: {}", path.display());
    Ok(if identical_configs == total_configs { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn report(c: &Value) -> Result<String> {
    if c["schema"] == "zmlx-stress/1" {
        return stress_report(c);
    }
    let summary = c.get("summary").and_then(Value::as_array).context("no summary")?;
    let mut out = String::new();
    out += &format!(
        "zmlx bench · {} · {} · commit {} · {}\n",
        c["model"]["path"].as_str().unwrap_or("?"),
        c["device"].as_str().unwrap_or("?"),
        c["git_commit"].as_str().unwrap_or("?"),
        if c["model"]["dummy_weights"] == true { "dummy weights" } else { "checkpoint weights" }
    );
    if let Some(l) = c["settings"]["launches_per_token"].as_u64() {
        out += &format!("launches per decode step: {l} (after the prompt)\n");
    }
    if let Some(sm) = c["settings"]["sampling"].as_object() {
        out += &format!("sampled: {}\n", sm.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    }
    out += &format!("{:>6} {:>8} {:>8} {:>14} {:>14} {:>5} {:>9}\n", "graph", "prompt", "gen", "decode tok/s", "prefill tok/s", "runs", "launches");
    for s in summary {
        // launches of the last decode step (the attention kernel changes with the length)
        let last = s["last_step_launches"].as_u64().map_or("-".to_string(), |l| l.to_string());
        out += &format!(
            "{:>6} {:>8} {:>8} {:>14.1} {:>14.1} {:>5} {:>9}\n",
            if s["graph"] == true { "on" } else { "off" },
            s["prompt_len"].as_u64().unwrap_or(0),
            s["gen_len"].as_u64().unwrap_or(0),
            s["median_generation_tps"].as_f64().unwrap_or(0.0),
            s["median_prompt_tps"].as_f64().unwrap_or(0.0),
            s["runs"].as_u64().unwrap_or(0),
            last
        );
    }
    out += &format!("fidelity: {}/{} runs token-identical\n", c["fidelity"]["identical"], c["fidelity"]["total"]);
    if let Some(p) = c["settings"]["patch"].as_str() {
        out += &format!("{p}\n");
    }
    if let Some(e) = c["routing"]["mean_entropy_bits"].as_f64() {
        out += &format!("routing: {} tokens, mean per-layer entropy {e:.2} bits\n", c["routing"]["tokens"]);
    }
    Ok(out)
}

fn stress_report(c: &Value) -> Result<String> {
    let rows = c["stress"].as_array().context("no stress rows")?;
    let mut out = format!(
        "zmlx bench --stress · {} · {} · commit {} · {}\n",
        c["model"]["path"].as_str().unwrap_or("?"),
        c["device"].as_str().unwrap_or("?"),
        c["git_commit"].as_str().unwrap_or("?"),
        c["settings"]["patch"].as_str().unwrap_or("")
    );
    let group = |key: &str| -> Vec<(String, f64, f64, usize, usize)> {
        let mut keys: Vec<String> = Vec::new();
        for r in rows {
            let k = r[key].to_string().trim_matches('"').to_string();
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .map(|k| {
                let sel: Vec<&Value> = rows.iter().filter(|r| r[key].to_string().trim_matches('"') == k).collect();
                let mut sp: Vec<f64> = sel.iter().filter_map(|r| r["speedup"].as_f64()).collect();
                let mut base: Vec<f64> = sel.iter().filter_map(|r| r["baseline_tps"].as_f64()).collect();
                let ident = sel.iter().filter(|r| r["identical"] == r["total"]).count();
                (k, median(&mut base), median(&mut sp), ident, sel.len())
            })
            .collect()
    };
    for (title, key) in [("by length", "gen_len"), ("by prompt style", "style")] {
        out += &format!("{title}:\n{:>20} {:>14} {:>10} {:>10}\n", key, "baseline tok/s", "speedup", "identical");
        for (k, base, sp, ident, n) in group(key) {
            out += &format!("{k:>20} {base:>14.1} {sp:>9.2}x {:>10}\n", format!("{ident}/{n}"));
        }
    }
    out += &format!("fidelity: {}/{} configs token-identical\n", c["fidelity"]["identical_configs"], c["fidelity"]["total_configs"]);
    Ok(out)
}

/// What every capsule records first: schema, time, commit, machine, GPU, device.
fn capsule_header(schema: &str, device: &str) -> Value {
    json!({
        "schema": schema,
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "git_commit": env!("ZMLX_GIT_COMMIT"),
        "machine": machine_info(),
        "gpu": gpu_info(),
        "device": device,
    })
}

fn machine_info() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()));
    let host = std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string());
    json!({"hostname": host, "cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "os": std::env::consts::OS})
}

fn gpu_info() -> Value {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let line = String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string();
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            json!({"name": f.first(), "driver": f.get(1), "memory": f.get(2), "max_sm_clock": f.get(3)})
        })
        .unwrap_or(Value::Null)
}
