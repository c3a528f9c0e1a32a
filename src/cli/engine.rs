//! Opening a decoder for a command: CPU reference or CUDA, real or dummy weights.

use anyhow::{bail, Result};
use zmlx_models::patch::{self, PatchOptions, PatchReport, Pattern};
use zmlx_models::{generate, Decoder, ModelFolder, SamplingOptions};

use super::Device;

/// Options shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Model folder or Hugging Face repo id (from the local cache).
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Random weights drawn on the device in the checkpoint's format, from config.json alone
    /// (CUDA). A config without a `quantization` block is quantized as mlx_lm.convert would.
    #[arg(long)]
    pub dummy_weights: bool,
    /// Bits for --dummy-weights when config.json has no quantization block.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Group size for --dummy-weights when config.json has no quantization block.
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// Seed of the dummy weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// CUDA: launch every kernel eagerly instead of replaying a captured graph.
    #[arg(long)]
    pub no_graph: bool,
    /// CUDA arithmetic. `fast`: f32 accumulation, fused patterns. `mlx-cpu`: every op rounded
    /// and summed as MLX's CPU backend does (unpatched, serial kernels, slow), so the logits
    /// equal the CPU reference's bit for bit. The CPU always computes as MLX's CPU.
    #[arg(long, value_enum, default_value = "fast")]
    pub numerics: Numerics,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    Fast,
    MlxCpu,
}

/// `--patterns`, `--exclude`, `--no-patch`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PatchArgs {
    /// Patterns to apply instead of the family preset (comma-separated; see `zmlx patch list`).
    #[arg(long)]
    pub patterns: Option<String>,
    /// Patterns to leave out.
    #[arg(long)]
    pub exclude: Option<String>,
    /// Run mlx-lm's op sequence, unpatched.
    #[arg(long)]
    pub no_patch: bool,
    /// smart_patch: time each candidate pattern on a sample decode and keep only those that
    /// are faster (by more than 2%) and token-identical.
    #[arg(long)]
    pub smart: bool,
}

impl PatchArgs {
    pub fn options(&self) -> Result<PatchOptions> {
        PatchOptions::parse(self.patterns.as_deref(), self.exclude.as_deref(), self.no_patch).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Apply the patch plan for this model and options; returns the report.
pub fn apply_patches(engine: &mut Engine, opts: &PatchOptions) -> Result<PatchReport> {
    let backend = engine.decoder.backend();
    let patterns = patch::plan(&engine.model_type, backend, opts);
    Ok(engine.decoder.patch(&patterns)?)
}

/// One row of the `--smart` table.
pub struct SmartRow {
    pub pattern: Pattern,
    pub tps: f64,
    pub speedup: f64,
    pub identical: bool,
    pub kept: bool,
}

/// `smart_patch`: time the unpatched path and each candidate pattern alone on a sample
/// decode; keep the patterns that are faster by more than `min_gain` and token-identical.
/// Leaves the engine patched with the kept set.
pub fn smart_patch(engine: &mut Engine, opts: &PatchOptions, prompt: &[u32], tokens: usize, runs: usize, min_gain: f64) -> Result<(Vec<Pattern>, Vec<SmartRow>, f64)> {
    let candidates = patch::plan(&engine.model_type, engine.decoder.backend(), opts);
    let sample = |d: &mut dyn Decoder, patterns: &[Pattern]| -> Result<(Vec<u32>, f64)> {
        d.patch(patterns)?;
        generate(d, prompt, 4.min(tokens), SamplingOptions::default(), &[], |_| {})?; // warm-up, capture
        let mut tps = Vec::new();
        let mut first = None;
        for _ in 0..runs.max(1) {
            d.reset();
            let (t, st) = generate(d, prompt, tokens, SamplingOptions::default(), &[], |_| {})?;
            tps.push(st.generation_tps);
            first.get_or_insert(t);
        }
        tps.sort_by(f64::total_cmp);
        Ok((first.unwrap_or_default(), tps[tps.len() / 2]))
    };
    let (base_tokens, base_tps) = sample(engine.decoder.as_mut(), &[])?;
    let mut rows = Vec::new();
    for p in candidates {
        let (t, tps) = sample(engine.decoder.as_mut(), &[p])?;
        let speedup = tps / base_tps.max(1e-9);
        let identical = t == base_tokens;
        rows.push(SmartRow { pattern: p, tps, speedup, identical, kept: identical && speedup > 1.0 + min_gain });
    }
    let kept: Vec<Pattern> = rows.iter().filter(|r| r.kept).map(|r| r.pattern).collect();
    engine.decoder.patch(&kept)?;
    Ok((kept, rows, base_tps))
}

pub fn print_smart_table(rows: &[SmartRow], base_tps: f64) {
    eprintln!("smart_patch: baseline {base_tps:.1} tok/s");
    eprintln!("{:<20} {:>10} {:>8} {:>10} {:>5}", "pattern", "tok/s", "speedup", "identical", "kept");
    for r in rows {
        eprintln!("{:<20} {:>10.1} {:>7.3}x {:>10} {:>5}", r.pattern.name(), r.tps, r.speedup, r.identical, if r.kept { "yes" } else { "no" });
    }
}

pub struct Engine {
    pub model_type: String,
    pub decoder: Box<dyn Decoder>,
    pub device_name: String,
    /// Kernel launches per decode step (CUDA), for the reports.
    pub weight_bytes: Option<usize>,
}

/// Open `folder` on the requested device with room for `max_len` tokens.
pub fn open(folder: ModelFolder, args: &EngineArgs, max_len: usize) -> Result<Engine> {
    match args.device {
        Device::Cpu => {
            if args.dummy_weights {
                bail!("--dummy-weights runs on CUDA only (full-size models do not fit the CPU reference)");
            }
            let model = folder.load_weights()?;
            Ok(Engine {
                model_type: model.config.model_type.clone(),
                decoder: Box::new(model.cpu_session()),
                device_name: "cpu".into(),
                weight_bytes: None,
            })
        }
        Device::Cuda(ordinal) => open_cuda(folder, args, ordinal, max_len),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_folder: ModelFolder, _args: &EngineArgs, _ordinal: usize, _max_len: usize) -> Result<Engine> {
    bail!("this zmlx was built without CUDA: rebuild with `cargo build --release --features cuda`")
}

#[cfg(feature = "cuda")]
fn open_cuda(folder: ModelFolder, args: &EngineArgs, ordinal: usize, max_len: usize) -> Result<Engine> {
    use zmlx_models::checkpoint::Checkpoint;
    use zmlx_models::config::Quantization;
    use zmlx_models::cuda::{CheckpointSource, CudaQwen3Moe, DummySource, WeightSource};
    use zmlx_models::models::qwen3_moe::ModelArgs;

    let dev = zmlx_cuda::CudaDevice::new(ordinal).map_err(|e| anyhow::anyhow!("CUDA device {ordinal}: {e}"))?;
    let model_args: ModelArgs = folder.config.args()?;
    model_args.validate(&folder.config)?;
    let ckpt;
    let quant;
    let source: Box<dyn WeightSource> = if args.dummy_weights {
        quant = if folder.config.quantization.default.is_some() {
            folder.config.quantization.clone()
        } else {
            Quantization::mlx_lm_convert(&folder.config, args.bits, args.group_size)?
        };
        let dtype = dtype_of_config(&folder)?;
        Box::new(DummySource::new(&dev, quant.clone(), dtype, args.weights_seed))
    } else {
        ckpt = Checkpoint::open(&folder.path)?;
        let dtype = zmlx_models::nn::Loader::infer_dtype(&ckpt, "model.embed_tokens")?;
        Box::new(CheckpointSource::new(&dev, &ckpt, &folder.config.quantization, dtype))
    };
    let mut engine = CudaQwen3Moe::new(dev.clone(), &model_args, source, max_len, !args.no_graph)?;
    if args.numerics == Numerics::MlxCpu {
        engine.use_mlx_cpu_numerics()?;
    }
    Ok(Engine {
        model_type: folder.config.model_type.clone(),
        device_name: format!("cuda:{ordinal} ({})", dev.name()),
        weight_bytes: Some(engine.weight_bytes),
        decoder: Box::new(engine),
    })
}

/// The compute dtype a config implies (`torch_dtype`, as mlx-lm's conversion keeps it).
#[cfg(feature = "cuda")]
fn dtype_of_config(folder: &ModelFolder) -> Result<zmlx_core::DType> {
    use zmlx_core::DType;
    let name = folder.config.raw.get("torch_dtype").or_else(|| folder.config.raw.get("dtype")).and_then(|v| v.as_str()).unwrap_or("bfloat16");
    Ok(match name {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        "float32" => DType::F32,
        other => bail!("{}: torch_dtype `{other}` is not supported", folder.config.path.display()),
    })
}
