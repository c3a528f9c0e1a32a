//! `zmlx patch list [--model M] [--device …]`: every pattern, what it fuses, and whether it is
//! on for that model and backend, with the reason.

use std::process::ExitCode;

use anyhow::Result;
use zmlx_models::patch::{self, Backend};
use zmlx_models::ModelFolder;

use super::Device;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Every pattern, what it fuses, on/off for the model and why.
    List {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "cuda")]
        device: Device,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    let Action::List { model, device } = args.action;
    let backend = if device == Device::Cpu { Backend::Cpu } else { Backend::Cuda };
    let model_type = match &model {
        Some(m) => Some(ModelFolder::open(m)?.config.model_type),
        None => None,
    };
    let family = model_type.as_deref().unwrap_or("qwen3_moe");
    println!("patterns for {family} on {backend:?}{}:", if model.is_none() { " (no --model: showing qwen3_moe)" } else { "" });
    println!("{:<20} {:<4} {:<48} why", "pattern", "on", "fuses");
    for e in patch::preset(family, backend) {
        println!("{:<20} {:<4} {:<48} {}", e.pattern.name(), if e.on { "yes" } else { "no" }, e.pattern.fuses(), e.why);
    }
    Ok(ExitCode::SUCCESS)
}
