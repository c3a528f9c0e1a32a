//! zmlx-core: dtypes, MLX-exact rounding and math, and MLX affine quantization.
//!
//! The CPU reference keeps activations as `f32` values that are always exactly
//! representable in the model's compute dtype: every op rounds its result with
//! [`DType::round`], which reproduces MLX's op-by-op rounding on the CPU.

pub mod dtype;
pub mod mlx_math;
pub mod ops;
pub mod quant;
pub mod sampling;

pub use dtype::DType;
pub use quant::{QuantSpec, QuantizedMatrix};

/// Errors from the core layer (bad shapes or unsupported formats).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, CoreError>;
