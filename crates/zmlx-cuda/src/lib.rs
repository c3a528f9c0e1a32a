//! zmlx-cuda: the CUDA kernel layer of zmlx.
//!
//! - [`runtime`]: [`CudaDevice`] (context + one stream), device buffers, a bump [`Arena`],
//!   CUDA graph capture/replay, event timers.
//! - [`nvrtc`]: finding libnvrtc, NVRTC compilation, the on-disk cubin cache.
//! - [`catalog`]: every kernel's CUDA C source; [`check_all_kernels`] compiles them all
//!   with NVRTC alone (no GPU), as CI does.
//! - [`ops`]: Rust launchers (qmv, gather_qmv, rms_norm, rope, kv_append, attention_decode,
//!   softmax_topk, moe_combine, swiglu, add, embed, argmax).
//! - [`reference`]: independent f64 host references; [`selftest`] / [`bench`]: the
//!   device self-tests and micro-benchmarks behind `examples/selftest.rs`.

pub mod bench;
pub mod catalog;
pub mod fused;
pub mod mlx_cpu;
pub mod nvrtc;
pub mod ops;
pub mod reference;
pub mod runtime;
pub mod selftest;

pub use bench::{run_benchmarks, BenchRow};
pub use catalog::check_all_kernels;
pub use ops::{AttnKernel, AttnShape, QuantWeight};
pub use runtime::{Arena, Arg, CudaDevice, CudaGraph, DevBuf, Event, HostU32};
pub use selftest::{run_self_tests, TestRow};
pub use zmlx_core::DType;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("NVRTC failed to compile {module}:\n{log}")]
    Compile { module: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;
