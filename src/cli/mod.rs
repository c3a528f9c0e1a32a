//! Subcommands. Each returns an exit code or an error that `main` prints as one line.

mod bench;
mod engine;
mod generate;
mod kernels;
mod patch_cmd;
mod validate;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "zmlx", version, about = "Fast, token-identical MoE decode from MLX quantized checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (like mlx_lm.generate).
    Generate(generate::Args),
    /// Benchmark decode: prompt lengths × generation lengths × runs → a capsule JSON.
    Bench(bench::Args),
    /// The CUDA kernel catalog: check (NVRTC compile, no GPU), test, bench.
    Kernels(kernels::Args),
    /// Patched vs unpatched greedy decode: identical tokens, tok/s, speedup.
    Validate(validate::Args),
    /// The fusion patterns: `zmlx patch list [--model M]`.
    Patch(patch_cmd::Args),
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Patch(args) => patch_cmd::run(args),
    }
}

/// `--device cpu | cuda[:N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (use cpu, cuda or cuda:N)")),
        }
    }
}

/// `--prompt-tokens 3,141,59`.
pub fn parse_token_list(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("--prompt-tokens: `{t}` is not a token id")))
        .collect()
}

