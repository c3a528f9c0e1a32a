//! MLX affine quantization, bit for bit with MLX's CPU backend.
//!
//! Format (what `mx.quantize(w, group_size, bits)` writes and mlx-lm checkpoints hold):
//! a weight `[rows, cols]` is cut into groups of `group_size` consecutive values along a
//! row; each group has a `scale` and a `bias` (stored in the weight's dtype) and every
//! value becomes an integer code `q` in `0..2^bits` with `w ≈ scale * q + bias`.
//! The codes of one row form a little-endian bit stream: code `i` occupies bits
//! `[i*bits, (i+1)*bits)` of the row's `u32` words (LSB first). For bits 2, 4, 8 that is
//! `32/bits` codes per word; for 3, 5 and 6 it is MLX's byte layout (8 codes in 3 bytes,
//! 8 codes in 5 bytes, 4 codes in 3 bytes), which is the same bit stream.
//!
//! Rounding (MLX CPU, `mlx/backend/cpu/quantized.cpp`):
//! - quantize works in `f32` throughout (min/max, scale, bias, codes) and rounds only the
//!   stored scale and bias to the dtype; codes are computed with the *unrounded* f32 scale.
//! - dequantize is `r(r(scale * q) + bias)` (`multiply` then `add`, each rounded to the dtype).
//! - `quantized_matmul(transpose=True)` on x86 takes the scalar `_qmm_t` path
//!   (`simd::max_size<T>` is 1): per output, `T sum = 0; sum += x * (scale * q + bias)` in
//!   element order, every op rounded to `T`. The inner `scale * q + bias` is exactly the
//!   dequantized value, so a row is dequantized once and then dotted with each input row.

use rayon::prelude::*;

use crate::{CoreError, DType, Result};

/// Bits and group size of an MLX affine quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    /// `bits` in {2,3,4,5,6,8}, `group_size` in {32,64,128} (what MLX supports).
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
            return Err(CoreError::Invalid(format!(
                "quantization bits {bits} not supported (MLX affine: 2, 3, 4, 5, 6, 8)"
            )));
        }
        if !matches!(group_size, 32 | 64 | 128) {
            return Err(CoreError::Invalid(format!(
                "quantization group size {group_size} not supported (MLX affine: 32, 64, 128)"
            )));
        }
        Ok(Self { bits, group_size })
    }

    /// `u32` words per row of `cols` values (`cols * bits / 32`, rounded up).
    pub fn packed_cols(&self, cols: usize) -> usize {
        (cols * self.bits as usize).div_ceil(32)
    }

    /// Largest code, `2^bits - 1`.
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}

/// Quantized weight `[rows, cols]` (out x in, as MLX stores it).
#[derive(Clone, Debug)]
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    /// `rows * spec.packed_cols(cols)` packed codes.
    pub words: Vec<u32>,
    /// `rows * cols / group_size`, exact in `dtype`.
    pub scales: Vec<f32>,
    /// `rows * cols / group_size`, exact in `dtype`.
    pub biases: Vec<f32>,
    /// dtype of scales/biases (= the compute dtype).
    pub dtype: DType,
}

/// Work above this many weights is spread over rayon's threads.
const PAR_THRESHOLD: usize = 1 << 16;

impl QuantizedMatrix {
    /// Assemble from checkpoint parts, checking every length.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        words: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        dtype: DType,
    ) -> Result<Self> {
        check_shape(rows, cols, spec, dtype)?;
        let nw = rows * spec.packed_cols(cols);
        if words.len() != nw {
            return Err(CoreError::Invalid(format!(
                "quantized weight [{rows}, {cols}] with bits={}: expected {nw} u32 words \
                 ([{rows}, {}]), got {}",
                spec.bits,
                spec.packed_cols(cols),
                words.len()
            )));
        }
        let ng = rows * (cols / spec.group_size);
        for (name, v) in [("scales", &scales), ("biases", &biases)] {
            if v.len() != ng {
                return Err(CoreError::Invalid(format!(
                    "quantized weight [{rows}, {cols}] with group_size={}: expected {ng} {name} \
                     ([{rows}, {}]), got {}",
                    spec.group_size,
                    cols / spec.group_size,
                    v.len()
                )));
            }
        }
        Ok(Self {
            rows,
            cols,
            spec,
            words,
            scales,
            biases,
            dtype,
        })
    }

    /// `mx.quantize(w, group_size, bits)` for `w` `[rows, cols]` of `dtype` (every value
    /// exactly representable in `dtype`): the same words, scales and biases as MLX's CPU.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        dtype: DType,
    ) -> Result<Self> {
        check_shape(rows, cols, spec, dtype)?;
        if w.len() != rows * cols {
            return Err(CoreError::Invalid(format!(
                "quantize: expected {} values for [{rows}, {cols}], got {}",
                rows * cols,
                w.len()
            )));
        }
        if let Some((i, v)) = w
            .iter()
            .enumerate()
            .find(|(_, v)| dtype.round(**v).to_bits() != v.to_bits())
        {
            return Err(CoreError::Invalid(format!(
                "quantize: value {v:e} at index {i} is not representable in {dtype}"
            )));
        }
        let wpr = spec.packed_cols(cols);
        let gpr = cols / spec.group_size;
        let mut words = vec![0u32; rows * wpr];
        let mut scales = vec![0f32; rows * gpr];
        let mut biases = vec![0f32; rows * gpr];
        type RowParts<'a> = (((&'a [f32], &'a mut [u32]), &'a mut [f32]), &'a mut [f32]);
        let work = |(((wrow, out), s), b): RowParts| quantize_row(wrow, out, s, b, spec, dtype);
        if rows * cols >= PAR_THRESHOLD {
            w.par_chunks(cols)
                .zip(words.par_chunks_mut(wpr))
                .zip(scales.par_chunks_mut(gpr))
                .zip(biases.par_chunks_mut(gpr))
                .for_each(work);
        } else {
            w.chunks(cols)
                .zip(words.chunks_mut(wpr))
                .zip(scales.chunks_mut(gpr))
                .zip(biases.chunks_mut(gpr))
                .for_each(work);
        }
        Ok(Self {
            rows,
            cols,
            spec,
            words,
            scales,
            biases,
            dtype,
        })
    }

    /// Packed words of one row.
    pub fn row_words(&self, row: usize) -> &[u32] {
        let wpr = self.spec.packed_cols(self.cols);
        &self.words[row * wpr..(row + 1) * wpr]
    }

    /// The integer codes of one row (`cols` values in `0..2^bits`).
    pub fn unpack_row(&self, row: usize) -> Vec<u32> {
        assert!(
            row < self.rows,
            "unpack_row: row {row} out of range ({} rows)",
            self.rows
        );
        let mut out = vec![0u32; self.cols];
        unpack_codes(self.row_words(row), self.spec.bits, &mut out);
        out
    }

    /// One row dequantized into `out` (`cols` values), as `mx.dequantize` rounds.
    pub fn dequantize_row_into(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows,
            "dequantize_row: row {row} out of range ({} rows)",
            self.rows
        );
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        let gpr = self.cols / self.spec.group_size;
        let s = &self.scales[row * gpr..(row + 1) * gpr];
        let b = &self.biases[row * gpr..(row + 1) * gpr];
        let bits = self.spec.bits;
        let mask = (1u64 << bits) - 1;
        let gs = self.spec.group_size;
        let dt = self.dtype;
        // Bit-stream reader over the row's words (LSB first).
        let mut it = self.row_words(row).iter();
        let mut acc: u64 = 0;
        let mut nbits: u32 = 0;
        for (g, chunk) in out.chunks_exact_mut(gs).enumerate() {
            let (scale, bias) = (s[g], b[g]);
            for o in chunk.iter_mut() {
                if nbits < bits {
                    acc |= (*it.next().expect("row words exhausted") as u64) << nbits;
                    nbits += 32;
                }
                let q = (acc & mask) as f32;
                acc >>= bits;
                nbits -= bits;
                *o = dt.round(dt.round(scale * q) + bias);
            }
        }
    }

    /// Output `row` of `quantized_matmul(x, w, transpose=True)` for one input vector `x`
    /// (`buf`: `cols` scratch values): the same value `matmul_t` computes for that row.
    pub fn dot_row(&self, row: usize, x: &[f32], buf: &mut [f32]) -> f32 {
        if exact_accumulation() {
            return dot_exact(self, row, x);
        }
        self.dequantize_row_into(row, buf);
        dot_rounded(x, buf, self.dtype)
    }

    /// One row dequantized (quantized embedding lookup).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        self.dequantize_row_into(row, &mut out);
        out
    }

    /// `mx.dequantize`: all rows `[rows, cols]`, with MLX's CPU rounding.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        if self.rows * self.cols >= PAR_THRESHOLD {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, o)| self.dequantize_row_into(r, o));
        } else {
            for (r, o) in out.chunks_mut(self.cols).enumerate() {
                self.dequantize_row_into(r, o);
            }
        }
        out
    }

    /// `mx.quantized_matmul(x, w, scales, biases, transpose=True)`: `x` is `[m, cols]`
    /// row-major (values exact in `self.dtype`), returns `[m, rows]`. Exact `_qmm_t`
    /// semantics: per output `sum = r(sum + r(x_k * w_k))` over k in order, where `w_k` is
    /// the dequantized weight. Parallel over output rows; the result does not depend on it.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "matmul_t: x has {} values, expected [m={m}, cols={}]",
            x.len(),
            self.cols
        );
        let (rows, cols, dt) = (self.rows, self.cols, self.dtype);
        // Transposed result [rows, m], so each task owns one weight row.
        let mut out_t = vec![0f32; rows * m];
        if m == 0 || rows == 0 {
            return out_t;
        }
        let exact = exact_accumulation();
        let row_task = |buf: &mut Vec<f32>, (n, o): (usize, &mut [f32])| {
            if exact {
                for (mi, y) in o.iter_mut().enumerate() {
                    *y = dot_exact(self, n, &x[mi * cols..(mi + 1) * cols]);
                }
                return;
            }
            self.dequantize_row_into(n, buf);
            for (mi, y) in o.iter_mut().enumerate() {
                *y = dot_rounded(&x[mi * cols..(mi + 1) * cols], buf, dt);
            }
        };
        if rows * cols >= PAR_THRESHOLD && rows > 1 {
            out_t
                .par_chunks_mut(m)
                .enumerate()
                .for_each_init(|| vec![0f32; cols], row_task);
        } else {
            let mut buf = vec![0f32; cols];
            for item in out_t.chunks_mut(m).enumerate() {
                row_task(&mut buf, item);
            }
        }
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * rows];
        for n in 0..rows {
            for mi in 0..m {
                out[mi * rows + n] = out_t[n * m + mi];
            }
        }
        out
    }
}

fn check_shape(rows: usize, cols: usize, spec: QuantSpec, dtype: DType) -> Result<()> {
    if !dtype.is_float() {
        return Err(CoreError::Invalid(format!(
            "quantized weight scales/biases must be a float dtype, got {dtype}"
        )));
    }
    if !cols.is_multiple_of(spec.group_size) {
        return Err(CoreError::Invalid(format!(
            "quantized weight [{rows}, {cols}]: cols must be a multiple of group_size {}",
            spec.group_size
        )));
    }
    Ok(())
}

static EXACT_ACCUMULATION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Switch every quantized matmul in this process between MLX's CPU arithmetic (the default:
/// bf16/f16 accumulation, op by op) and exact accumulation: the dot product of `x` with the
/// unrounded dequantized weights `scale*q + bias`, summed in f64 and rounded once. The
/// second is what an f32-accumulating GPU kernel approximates (to ~1e-7), so it is the CPU
/// reference for checking CUDA; MLX's own CPU and GPU backends differ in the same way.
pub fn set_exact_accumulation(on: bool) {
    EXACT_ACCUMULATION.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn exact_accumulation() -> bool {
    EXACT_ACCUMULATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// `exact_accumulation` for one output: f64 sum of x * (scale*q + bias), rounded once.
fn dot_exact(m: &QuantizedMatrix, row: usize, x: &[f32]) -> f32 {
    let gs = m.spec.group_size;
    let gpr = m.cols / gs;
    let codes = m.unpack_row(row);
    let mut acc = 0f64;
    for (i, (&q, &xv)) in codes.iter().zip(x).enumerate() {
        let g = row * gpr + i / gs;
        acc += xv as f64 * (m.scales[g] as f64 * q as f64 + m.biases[g] as f64);
    }
    m.dtype.round(acc as f32)
}

/// `T sum = 0; for k: sum += x[k] * w[k]` with every op rounded to `dt` (plain f32 for F32,
/// no fused multiply-add).
#[inline]
fn dot_rounded(x: &[f32], w: &[f32], dt: DType) -> f32 {
    let mut sum = 0f32;
    match dt {
        DType::F32 => {
            for (a, b) in x.iter().zip(w) {
                sum += a * b;
            }
        }
        _ => {
            for (a, b) in x.iter().zip(w) {
                sum = dt.round(sum + dt.round(a * b));
            }
        }
    }
    sum
}

/// MLX's CPU `quantize` for one row: f32 arithmetic, codes from the unrounded f32 scale.
fn quantize_row(
    w: &[f32],
    words: &mut [u32],
    scales: &mut [f32],
    biases: &mut [f32],
    spec: QuantSpec,
    dtype: DType,
) {
    let n_bins = spec.max_code() as f32;
    let eps = 1e-7f32;
    let bits = spec.bits;
    let mut codes = vec![0u32; spec.group_size];
    let mut writer = BitWriter::new(words);
    for (g, grp) in w.chunks_exact(spec.group_size).enumerate() {
        let mut w_max = f32::NEG_INFINITY;
        let mut w_min = f32::INFINITY;
        for &v in grp {
            // std::max(a, b) = a < b ? b : a; std::min(a, b) = b < a ? b : a
            if w_max < v {
                w_max = v;
            }
            if v < w_min {
                w_min = v;
            }
        }
        let mask = w_min.abs() > w_max.abs();
        let mut scale = (w_max - w_min) / n_bins;
        if scale < eps {
            scale = eps;
        }
        if !mask {
            scale = -scale;
        }
        let edge = if mask { w_min } else { w_max };
        let q0 = (edge / scale).round_ties_even();
        let mut bias = 0f32;
        if q0 != 0.0 {
            scale = edge / q0;
            bias = edge;
        }
        for (c, &v) in codes.iter_mut().zip(grp) {
            let q = ((v - bias) / scale).round_ties_even();
            // std::min(std::max(q, 0), n_bins); NaN never reaches here for finite inputs.
            let q = if q < 0.0 { 0.0 } else { q };
            let q = if n_bins < q { n_bins } else { q };
            *c = q as u32;
        }
        for &c in &codes {
            writer.push(c, bits);
        }
        scales[g] = dtype.round(scale);
        biases[g] = dtype.round(bias);
    }
    writer.finish();
}

/// Writes codes LSB first into consecutive u32 words.
struct BitWriter<'a> {
    out: &'a mut [u32],
    pos: usize,
    acc: u64,
    nbits: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut [u32]) -> Self {
        Self {
            out,
            pos: 0,
            acc: 0,
            nbits: 0,
        }
    }

    #[inline]
    fn push(&mut self, code: u32, bits: u32) {
        self.acc |= (code as u64) << self.nbits;
        self.nbits += bits;
        if self.nbits >= 32 {
            self.out[self.pos] = self.acc as u32;
            self.pos += 1;
            self.acc >>= 32;
            self.nbits -= 32;
        }
    }

    fn finish(mut self) {
        if self.nbits > 0 {
            self.out[self.pos] = self.acc as u32;
            self.pos += 1;
            self.nbits = 0;
        }
        debug_assert_eq!(self.pos, self.out.len());
    }
}

/// Pack `codes` (each `< 2^bits`) into `ceil(len*bits/32)` words, MLX's layout.
pub fn pack_codes(codes: &[u32], bits: u32) -> Vec<u32> {
    let mut out = vec![0u32; (codes.len() * bits as usize).div_ceil(32)];
    let mask = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let mut w = BitWriter::new(&mut out);
    for &c in codes {
        assert!(
            c <= mask,
            "pack_codes: code {c} does not fit in {bits} bits"
        );
        w.push(c, bits);
    }
    w.finish();
    out
}

/// Unpack `out.len()` codes of `bits` bits from `words` (MLX's layout).
pub fn unpack_codes(words: &[u32], bits: u32, out: &mut [u32]) {
    let mask = (1u64 << bits) - 1;
    let mut it = words.iter();
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    for o in out.iter_mut() {
        if nbits < bits {
            acc |= (*it.next().expect("unpack_codes: words exhausted") as u64) << nbits;
            nbits += 32;
        }
        *o = (acc & mask) as u32;
        acc >>= bits;
        nbits -= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn normal(&mut self) -> f32 {
            // Irwin-Hall approximation is plenty for tests.
            let s: f64 = (0..12)
                .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64)
                .sum();
            (s - 6.0) as f32
        }
    }

    /// MLX's `extract_bits` byte formulas (mlx/backend/cpu/quantized.cpp), as an
    /// independent statement of the 3/5/6-bit layouts.
    fn mlx_extract(bytes: &[u8], bits: u32) -> Vec<u32> {
        let w = |i: usize| bytes[i] as u32;
        match bits {
            3 => vec![
                w(0) & 0x7,
                (w(0) & 0x38) >> 3,
                ((w(0) & 0xc0) >> 6) + ((w(1) & 0x1) << 2),
                (w(1) & 0xe) >> 1,
                (w(1) & 0x70) >> 4,
                ((w(1) & 0x80) >> 7) + ((w(2) & 0x3) << 1),
                (w(2) & 0x1c) >> 2,
                (w(2) & 0xe0) >> 5,
            ],
            5 => vec![
                w(0) & 0x1f,
                ((w(0) & 0xe0) >> 5) + ((w(1) & 0x3) << 3),
                (w(1) & 0x7c) >> 2,
                ((w(1) & 0x80) >> 7) + ((w(2) & 0xf) << 1),
                ((w(2) & 0xf0) >> 4) + ((w(3) & 0x1) << 4),
                (w(3) & 0x3e) >> 1,
                ((w(3) & 0xc0) >> 6) + ((w(4) & 0x7) << 2),
                (w(4) & 0xf8) >> 3,
            ],
            6 => vec![
                w(0) & 0x3f,
                ((w(0) >> 6) & 0x03) + ((w(1) & 0x0f) << 2),
                ((w(1) >> 4) & 0x0f) + ((w(2) & 0x03) << 4),
                (w(2) >> 2) & 0x3f,
            ],
            _ => unreachable!(),
        }
    }

    #[test]
    fn pack_unpack_round_trip_random_codes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for bits in [2u32, 3, 4, 5, 6, 8] {
            for len in [32usize, 64, 96, 128, 384, 4096] {
                let codes: Vec<u32> = (0..len)
                    .map(|_| (rng.next() as u32) & ((1 << bits) - 1))
                    .collect();
                let words = pack_codes(&codes, bits);
                assert_eq!(words.len(), len * bits as usize / 32);
                let mut back = vec![0u32; len];
                unpack_codes(&words, bits, &mut back);
                assert_eq!(back, codes, "bits={bits} len={len}");
                // Through a QuantizedMatrix too (2 rows).
                let spec = QuantSpec::new(bits, 32).unwrap();
                let mut two = words.clone();
                two.extend_from_slice(&words);
                let g = 2 * len / 32;
                let qm = QuantizedMatrix::from_parts(
                    2,
                    len,
                    spec,
                    two,
                    vec![1.0; g],
                    vec![0.0; g],
                    DType::F32,
                )
                .unwrap();
                assert_eq!(qm.unpack_row(1), codes);
                let deq: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
                assert_eq!(qm.dequantize_row(1), deq);
            }
        }
    }

    #[test]
    fn layouts_match_mlx_extract_bits_and_power_of_two_words() {
        let mut rng = Rng(12345);
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let codes: Vec<u32> = (0..256)
                .map(|_| (rng.next() as u32) & ((1 << bits) - 1))
                .collect();
            let words = pack_codes(&codes, bits);
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut got = Vec::new();
            if bits.is_power_of_two() {
                // 32/bits codes per word, LSB first.
                let per = 32 / bits;
                for w in &words {
                    for p in 0..per {
                        got.push((w >> (p * bits)) & ((1 << bits) - 1));
                    }
                }
            } else {
                let (bpp, ppk) = match bits {
                    3 => (3, 8),
                    5 => (5, 8),
                    _ => (3, 4),
                };
                for chunk in bytes.chunks_exact(bpp) {
                    let e = mlx_extract(chunk, bits);
                    assert_eq!(e.len(), ppk);
                    got.extend(e);
                }
            }
            assert_eq!(got, codes, "bits={bits}");
        }
    }

    #[test]
    fn spec_validation() {
        for b in [2, 3, 4, 5, 6, 8] {
            for g in [32, 64, 128] {
                assert!(QuantSpec::new(b, g).is_ok());
            }
        }
        assert!(QuantSpec::new(7, 64).is_err());
        assert!(QuantSpec::new(1, 64).is_err());
        assert!(QuantSpec::new(16, 64).is_err());
        assert!(QuantSpec::new(4, 16).is_err());
        assert!(QuantSpec::new(4, 256).is_err());
        let s = QuantSpec::new(3, 64).unwrap();
        assert_eq!(s.packed_cols(128), 12);
        assert!(QuantizedMatrix::from_parts(
            2,
            100,
            s,
            vec![0; 20],
            vec![0.0; 2],
            vec![0.0; 2],
            DType::BF16
        )
        .is_err());
        assert!(QuantizedMatrix::from_parts(
            2,
            128,
            s,
            vec![0; 23],
            vec![0.0; 4],
            vec![0.0; 4],
            DType::BF16
        )
        .is_err());
        assert!(QuantizedMatrix::from_parts(
            2,
            128,
            s,
            vec![0; 24],
            vec![0.0; 3],
            vec![0.0; 4],
            DType::BF16
        )
        .is_err());
        assert!(QuantizedMatrix::from_parts(
            2,
            128,
            s,
            vec![0; 24],
            vec![0.0; 4],
            vec![0.0; 4],
            DType::U32
        )
        .is_err());
        assert!(QuantizedMatrix::from_parts(
            2,
            128,
            s,
            vec![0; 24],
            vec![0.0; 4],
            vec![0.0; 4],
            DType::BF16
        )
        .is_ok());
        // quantize refuses values that are not exact in the dtype.
        assert!(QuantizedMatrix::quantize(
            &[0.1; 64],
            1,
            64,
            QuantSpec::new(4, 64).unwrap(),
            DType::BF16
        )
        .is_err());
    }

    #[test]
    fn quantize_reconstructs_within_half_step_and_threads_agree() {
        let mut rng = Rng(777);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for bits in [2u32, 3, 4, 5, 6, 8] {
                let (rows, cols) = (300, 256); // above the parallel threshold
                let w: Vec<f32> = (0..rows * cols).map(|_| dt.round(rng.normal())).collect();
                let spec = QuantSpec::new(bits, 64).unwrap();
                let q = QuantizedMatrix::quantize(&w, rows, cols, spec, dt).unwrap();
                let d = q.dequantize();
                for r in 0..rows {
                    for g in 0..cols / 64 {
                        let s = q.scales[r * (cols / 64) + g].abs();
                        for k in g * 64..(g + 1) * 64 {
                            let i = r * cols + k;
                            // Half a step, except at the far end of the range where MLX's
                            // snapping of the scale to edge/q0 can clip up to one step;
                            // plus, for f16/bf16, the rounding of the stored scale (times a
                            // code up to 255) and of the result.
                            let err = (d[i] - w[i]).abs();
                            let tol = if dt == DType::F32 {
                                1.0 * s + 1e-6
                            } else {
                                1.6 * s + 0.01 * w[i].abs()
                            };
                            assert!(err <= tol, "{dt} bits={bits} err={err} step={s}");
                        }
                    }
                }
                // Row-wise and serial (small) paths agree with the parallel ones.
                for r in [0, 17, rows - 1] {
                    assert_eq!(q.dequantize_row(r), d[r * cols..(r + 1) * cols].to_vec());
                    let small =
                        QuantizedMatrix::quantize(&w[r * cols..(r + 1) * cols], 1, cols, spec, dt)
                            .unwrap();
                    assert_eq!(small.words, q.row_words(r));
                }
                let m = 2;
                let x: Vec<f32> = (0..m * cols).map(|_| dt.round(rng.normal())).collect();
                let y = q.matmul_t(&x, m);
                for n in [0, 5, rows - 1] {
                    let row = QuantizedMatrix::from_parts(
                        1,
                        cols,
                        spec,
                        q.row_words(n).to_vec(),
                        q.scales[n * 4..n * 4 + 4].to_vec(),
                        q.biases[n * 4..n * 4 + 4].to_vec(),
                        dt,
                    )
                    .unwrap();
                    for mi in 0..m {
                        let y1 = row.matmul_t(&x[mi * cols..(mi + 1) * cols], 1);
                        assert_eq!(y1[0].to_bits(), y[mi * rows + n].to_bits());
                    }
                }
            }
        }
    }
}
