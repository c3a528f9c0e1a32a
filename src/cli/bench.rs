//! `zmlx bench`: prompt lengths × generation lengths × runs (after a warm-up), medians,
//! one capsule JSON under benchmarks/capsules/; `zmlx bench report CAPSULE` prints it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use zmlx_models::{generate, ModelFolder, SamplingOptions};

use super::engine::{self, EngineArgs};

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
}

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
    let Some(eargs) = args.engine else { bail!("give --model (or `zmlx bench report CAPSULE`)") };
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
    let mut weight_bytes = None;
    let mut reference_tokens: std::collections::HashMap<(usize, usize), Vec<u32>> = Default::default();
    for &graph in &modes {
        let mut e = eargs.clone();
        e.no_graph = !graph;
        let t0 = Instant::now();
        let folder = ModelFolder::open(&e.model)?;
        let mut engine = engine::open(folder, &e, max_len)?;
        let load_s = t0.elapsed().as_secs_f64();
        device_name = engine.device_name.clone();
        launches = engine.decoder.launches_per_token();
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
                generate(engine.decoder.as_mut(), &prompt, 4.min(gl), SamplingOptions::default(), &[], |_| {})?;
                let (mut decode, mut prefill) = (Vec::new(), Vec::new());
                for r in 0..args.runs {
                    engine.decoder.reset();
                    let (tokens, stats) = generate(engine.decoder.as_mut(), &prompt, gl, SamplingOptions::default(), &[], |_| {})?;
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
                summary.push(json!({"graph": graph, "prompt_len": pl, "gen_len": gl,
                    "median_generation_tps": median(&mut decode), "median_prompt_tps": median(&mut prefill), "runs": args.runs}));
            }
        }
    }
    let folder = ModelFolder::open(&eargs.model)?;
    let capsule = json!({
        "schema": "zmlx-bench/1",
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "git_commit": env!("ZMLX_GIT_COMMIT"),
        "machine": machine_info(),
        "gpu": gpu_info(),
        "device": device_name,
        "model": {"path": eargs.model, "model_type": folder.config.model_type, "dummy_weights": eargs.dummy_weights,
                  "bits": eargs.bits, "group_size": eargs.group_size, "config": folder.config.raw},
        "settings": {"prompt_lens": args.prompt_lens, "gen_lens": args.gen_lens, "runs": args.runs, "warmup_runs": 1,
                     "graph_modes": modes, "sampling": "greedy", "launches_per_token": launches, "weight_bytes_on_device": weight_bytes},
        "fidelity": {"identical": fidelity_identical, "total": fidelity_total,
                     "what": "greedy tokens of every run equal the first run of the same (prompt, gen) config, across graph modes"},
        "summary": summary,
        "runs": runs,
    });
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("{}: cannot create", args.out_dir.display()))?;
    let name = args.name.unwrap_or_else(|| {
        let base = std::path::Path::new(&eargs.model).file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
        format!("{base}-{}-{}", if eargs.dummy_weights { "dummy" } else { "weights" }, capsule["created_unix"])
    });
    let mut path = args.out_dir.join(format!("{name}.json"));
    // Never overwrite an existing capsule.
    let mut i = 1;
    while path.exists() {
        path = args.out_dir.join(format!("{name}-{i}.json"));
        i += 1;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&capsule)?)?;
    print!("{}", report(&capsule)?);
    println!("capsule: {}", path.display());
    Ok(if fidelity_identical == fidelity_total { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn report(c: &Value) -> Result<String> {
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
        out += &format!("launches per decode step: {l}\n");
    }
    out += &format!("{:>6} {:>8} {:>8} {:>14} {:>14} {:>5}\n", "graph", "prompt", "gen", "decode tok/s", "prefill tok/s", "runs");
    for s in summary {
        out += &format!(
            "{:>6} {:>8} {:>8} {:>14.1} {:>14.1} {:>5}\n",
            if s["graph"] == true { "on" } else { "off" },
            s["prompt_len"].as_u64().unwrap_or(0),
            s["gen_len"].as_u64().unwrap_or(0),
            s["median_generation_tps"].as_f64().unwrap_or(0.0),
            s["median_prompt_tps"].as_f64().unwrap_or(0.0),
            s["runs"].as_u64().unwrap_or(0)
        );
    }
    out += &format!("fidelity: {}/{} runs token-identical\n", c["fidelity"]["identical"], c["fidelity"]["total"]);
    Ok(out)
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
