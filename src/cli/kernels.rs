//! `zmlx kernels`: compile every CUDA kernel with NVRTC (`check`, no GPU needed), run the
//! device self-tests against independent references (`test`), and micro-benchmark them
//! against the measured copy bandwidth (`bench`).

use std::process::ExitCode;

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Compile every kernel with NVRTC for an arch (no GPU needed); fails loudly on any error.
    Check {
        #[arg(long, default_value = "cuda")]
        backend: String,
        /// Target architecture.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Compile every module, also those whose cubin for this exact source, options and arch
        /// is already in the kernel cache (by default those are only checked for their functions).
        #[arg(long)]
        fresh: bool,
    },
    /// Run every kernel on the GPU against its reference on fresh random inputs.
    Test {
        #[arg(long, default_value = "cuda")]
        backend: String,
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Time every kernel; report GB/s and % of the measured copy bandwidth.
    Bench {
        #[arg(long, default_value = "cuda")]
        backend: String,
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
}

fn require_cuda_backend(backend: &str) -> Result<()> {
    if backend != "cuda" {
        bail!("--backend {backend}: only `cuda` has kernels to check (the CPU reference is plain Rust)");
    }
    if !cfg!(feature = "cuda") {
        bail!("this zmlx was built without CUDA: rebuild with `cargo build --release --features cuda`");
    }
    Ok(())
}

pub fn run(args: Args) -> Result<ExitCode> {
    match &args.action {
        Action::Check { backend, .. } | Action::Test { backend, .. } | Action::Bench { backend, .. } => require_cuda_backend(backend)?,
    }
    imp::run(args.action)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn run(_: super::Action) -> anyhow::Result<std::process::ExitCode> {
        unreachable!("require_cuda_backend refused")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::process::ExitCode;

    use anyhow::{anyhow, Result};

    use super::Action;

    pub fn run(action: Action) -> Result<ExitCode> {
        match action {
            Action::Check { arch, fresh, .. } => {
                let lib = zmlx_cuda::nvrtc::ensure_nvrtc().map_err(|e| anyhow!("{e}"))?;
                let results = zmlx_cuda::check_all_kernels(&arch, !fresh).map_err(|e| anyhow!("{e}"))?;
                let mut failed = 0;
                for (module, res) in &results {
                    match res {
                        Ok(false) => println!("ok    {module}"),
                        Ok(true) => println!("ok    {module} (cached)"),
                        Err(log) => {
                            failed += 1;
                            println!("FAIL  {module}\n{log}");
                        }
                    }
                }
                let cached = results.iter().filter(|(_, r)| matches!(r, Ok(true))).count();
                println!("{} modules for {arch} with NVRTC ({lib}; {cached} from the kernel cache): {} ok, {failed} failed", results.len(), results.len() - failed);
                Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
            }
            Action::Test { device, .. } => {
                let dev = zmlx_cuda::CudaDevice::new(device).map_err(|e| anyhow!("CUDA device {device}: {e}"))?;
                let rows = zmlx_cuda::run_self_tests(&dev);
                print!("{}", zmlx_cuda::selftest::format_tests(&rows));
                let failed = rows.iter().filter(|r| !r.passed).count();
                println!("{} passed, {failed} failed", rows.len() - failed);
                Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
            }
            Action::Bench { device, .. } => {
                let dev = zmlx_cuda::CudaDevice::new(device).map_err(|e| anyhow!("CUDA device {device}: {e}"))?;
                let rows = zmlx_cuda::run_benchmarks(&dev);
                print!("{}", zmlx_cuda::bench::format_bench(&rows));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
