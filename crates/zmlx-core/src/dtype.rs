//! Element types and MLX-exact rounding between them.

use half::{bf16, f16};

/// Element types that appear in MLX checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
    U8,
    I64,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::U8 => "uint8",
            DType::I64 => "int64",
        }
    }

    /// Round an f32 to the nearest value of this float dtype (ties to even), as
    /// MLX does when it stores an op's result. Identity for f32.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::BF16 => round_bf16(x),
            DType::F16 => f16::from_f32(x).to_f32(),
            _ => x,
        }
    }

    /// Round every element in place.
    pub fn round_slice(self, xs: &mut [f32]) {
        if self != DType::F32 {
            for x in xs.iter_mut() {
                *x = self.round(*x);
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// MLX's `_MLX_BFloat16(float)`: round to nearest even on the upper 16 bits,
/// NaN to the canonical quiet NaN.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::from_bits(0x7FC0_0000);
    }
    let u = x.to_bits();
    let r = u.wrapping_add(((u >> 16) & 1) + 0x7FFF) & 0xFFFF_0000;
    f32::from_bits(r)
}

/// Encode f32 carriers (values exact in `dtype`) as the dtype's little-endian bytes;
/// integer dtypes are treated as f32. The inverse of [`floats_from_le_bytes`].
pub fn floats_to_le_bytes(dtype: DType, xs: &[f32]) -> Vec<u8> {
    match dtype {
        DType::BF16 => xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F16 => xs.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        _ => xs.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Decode little-endian bytes of a float dtype into f32 values.
pub fn floats_from_le_bytes(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_crate() {
        // half's from_f32 is also round-to-nearest-even; agree on a sweep of bit patterns.
        let mut state = 0x1234_5678_u32;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = f32::from_bits(state);
            if x.is_nan() {
                continue;
            }
            assert_eq!(round_bf16(x).to_bits(), bf16::from_f32(x).to_f32().to_bits(), "{x:e}");
        }
    }
}
