//! Independent host references (f64 from dequantized values) and test-data helpers.
//! Nothing here shares code with the kernels: codes are unpacked from the byte stream
//! bit by bit, sums are f64.

use zmlx_core::DType;

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    /// `n` values uniform in [lo, hi), rounded to `dt`.
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32, dt: DType) -> Vec<f32> {
        (0..n).map(|_| dt.round(self.uniform(lo, hi))).collect()
    }
    pub fn words(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.next_u32()).collect()
    }
}

/// Encode f32 values (already exact in `dt`) as the dtype's little-endian bytes.
pub fn encode(dt: DType, v: &[f32]) -> Vec<u8> {
    zmlx_core::dtype::floats_to_le_bytes(dt, v)
}

/// Decode dtype bytes to f32.
pub fn decode(dt: DType, b: &[u8]) -> Vec<f32> {
    zmlx_core::dtype::floats_from_le_bytes(dt, b).expect("float dtype")
}

/// Code `j` of a row whose packed words start at word `row_word`: read bit by bit from
/// the little-endian byte stream (MLX's layout for every bit width).
pub fn code(words: &[u32], row_word: usize, j: usize, bits: u32) -> u32 {
    let mut v = 0u32;
    for b in 0..bits as usize {
        let bit = j * bits as usize + b;
        let byte = (words[row_word + bit / 32] >> (8 * ((bit / 8) % 4))) as u8;
        v |= (((byte >> (bit % 8)) & 1) as u32) << b;
    }
    v
}

/// A reference value with the scale of its terms (Σ|terms|), for tolerances under cancellation.
#[derive(Clone, Copy, Debug)]
pub struct RefVal {
    pub v: f64,
    pub scale: f64,
}

/// f64 y = W x for quantized W (expert `e` of a stacked [E, N, K]): w = s*q + b.
#[allow(clippy::too_many_arguments)]
pub fn qmv(words: &[u32], scales: &[f32], biases: &[f32], x: &[f32], e: usize, n: usize, k: usize, bits: u32, gs: usize) -> Vec<RefVal> {
    let wpr = k * bits as usize / 32;
    let groups = k / gs;
    (0..n)
        .map(|r| {
            let row = e * n + r;
            let (mut acc, mut sc) = (0.0f64, 0.0f64);
            for j in 0..k {
                let q = code(words, row * wpr, j, bits) as f64;
                let g = row * groups + j / gs;
                let w = scales[g] as f64 * q + biases[g] as f64;
                acc += w * x[j] as f64;
                sc += (w * x[j] as f64).abs();
            }
            RefVal { v: acc, scale: sc }
        })
        .collect()
}

/// f64 single-token attention for GQA. q is scaled as MLX does: r(q * r(scale)).
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], kc: &[f32], vc: &[f32], n_heads: usize, n_kv: usize, hd: usize, max_len: usize, len: usize, scale: f32, dt: DType) -> Vec<RefVal> {
    let g = n_heads / n_kv;
    let sr = dt.round(scale);
    let mut out = Vec::with_capacity(n_heads * hd);
    for h in 0..n_heads {
        let kvh = h / g;
        let qs: Vec<f64> = (0..hd).map(|d| dt.round(q[h * hd + d] * sr) as f64).collect();
        let scores: Vec<f64> = (0..len)
            .map(|t| (0..hd).map(|d| qs[d] * kc[(kvh * max_len + t) * hd + d] as f64).sum())
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = p.iter().sum();
        for d in 0..hd {
            let (mut acc, mut sc) = (0.0, 0.0);
            for t in 0..len {
                let v = vc[(kvh * max_len + t) * hd + d] as f64;
                acc += p[t] * v;
                sc += (p[t] * v).abs();
            }
            out.push(RefVal { v: acc / z, scale: sc / z });
        }
    }
    out
}

/// Unit in the last place of `dt` at magnitude |x| (f32: 2^-23 relative).
pub fn ulp(dt: DType, x: f64) -> f64 {
    let mant = match dt {
        DType::BF16 => 7,
        DType::F16 => 10,
        _ => 23,
    };
    let min_exp = match dt {
        DType::F16 => -14,
        _ => -126,
    };
    let e = if x == 0.0 { min_exp } else { (x.abs().log2().floor() as i32).max(min_exp) };
    2f64.powi(e - mant)
}

/// Comparison result: worst error in units of the per-element tolerance (pass ≤ 1), the
/// relative norm ‖out − ref‖/‖ref‖, and how many outputs were never written (NaN).
#[derive(Clone, Copy, Debug)]
pub struct Cmp {
    pub worst: f64,
    pub rel_norm: f64,
    pub unwritten: usize,
}

/// Per element: |out − ref| ≤ 1 ulp(dt, ref) + 1e-5·Σ|terms| (f32: 4 ulp + 1e-6·Σ|terms|).
pub fn compare(dt: DType, out: &[f32], refs: &[RefVal]) -> Cmp {
    assert_eq!(out.len(), refs.len());
    let (mut worst, mut num, mut den, mut unwritten) = (0.0f64, 0.0f64, 0.0f64, 0);
    for (&o, r) in out.iter().zip(refs) {
        if !o.is_finite() {
            unwritten += 1;
            continue;
        }
        let err = (o as f64 - r.v).abs();
        let tol = match dt {
            DType::F32 => 4.0 * ulp(dt, r.v) + 1e-6 * r.scale,
            _ => ulp(dt, r.v) + 1e-5 * r.scale,
        };
        worst = worst.max(err / tol);
        num += err * err;
        den += r.v * r.v;
    }
    Cmp { worst, rel_norm: (num / den.max(1e-300)).sqrt(), unwritten }
}

/// Relative-norm bound per dtype (bf16 rounding alone gives ~1.1e-3 on random data).
pub fn norm_bound(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 2.5e-3,
        DType::F16 => 4e-4,
        _ => 1e-5,
    }
}

// ---- dummy-weight fills ----

/// Value `i` of the fill stream `seed` (the sampler's stream too).
pub use zmlx_core::sampling::stream_hash as fill_hash;

/// Word `i` of `ops::fill_random_u32(seed)`.
pub fn fill_u32(seed: u64, i: u64) -> u32 {
    (fill_hash(seed, i) >> 32) as u32
}

/// Value `i` of `ops::fill_random_uniform(dt, seed, lo, hi)`: r(lo + (hi - lo)·u), u = 24 bits / 2^24.
pub fn fill_uniform(dt: DType, seed: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let u = (fill_hash(seed, i) >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    dt.round(lo + (hi - lo) * u)
}

// ---- greedy token (mlx-lm: argmax(logits - logsumexp(logits))) ----

/// f32 max ignoring NaN (`f32::max`), as MLX's max reduction.
pub fn max_f32(l: &[f32]) -> f32 {
    l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// MLX CPU `logsumexp` of a row of `dt` values: sequential f32 sum of MLX-exp(l - max),
/// `ln` (libm `logf`), + max, rounded to `dt`; max when max is infinite.
pub fn logsumexp_seq(dt: DType, l: &[f32]) -> f32 {
    let m = max_f32(l);
    if m.is_infinite() {
        return dt.round(m);
    }
    let mut s = 0.0f32;
    for &v in l {
        s += zmlx_core::mlx_math::exp(v - m);
    }
    dt.round(s.ln() + m)
}

/// f64 logsumexp (no rounding), for tolerances.
pub fn logsumexp_f64(l: &[f32]) -> f64 {
    let m = max_f32(l) as f64;
    m + l.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// First index of the maximum of r(l_i - lse) (rounded to `dt`); 0 when that maximum is NaN
/// (MLX's argmax over a NaN row keeps index 0).
pub fn greedy_token(dt: DType, l: &[f32], lse: f32) -> usize {
    let lp: Vec<f32> = l.iter().map(|&v| dt.round(v - lse)).collect();
    let mut best = 0;
    for i in 1..lp.len() {
        if lp[i] > lp[best] {
            best = i;
        }
    }
    best
}

// ---- dense matvec ----

/// MLX CPU gemm order for one output row: f32 accumulator from 0, `acc += x[k]*w[k]` in k
/// order (product, then add), rounded to `dt` once.
pub fn dense_row_seq(dt: DType, w: &[f32], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (a, b) in x.iter().zip(w) {
        acc += a * b;
    }
    dt.round(acc)
}

/// f64 dot product with its Σ|terms|.
pub fn dense_row_f64(w: &[f32], x: &[f32]) -> RefVal {
    let (mut v, mut s) = (0.0f64, 0.0f64);
    for (a, b) in x.iter().zip(w) {
        let t = *a as f64 * *b as f64;
        v += t;
        s += t.abs();
    }
    RefVal { v, scale: s }
}

// ---- router ----

/// MLX `softmax(precise=True)` of one row: f32 max, sequential f32 sum of MLX-exp(l - max),
/// p = exp(l - max) · (1/sum), rounded to `dt` when `round_probs`.
pub fn softmax_seq(dt: DType, l: &[f32], round_probs: bool) -> Vec<f32> {
    let m = max_f32(l);
    let mut s = 0.0f32;
    for &v in l {
        s += zmlx_core::mlx_math::exp(v - m);
    }
    let inv = 1.0f32 / s;
    l.iter()
        .map(|&v| {
            let p = zmlx_core::mlx_math::exp(v - m) * inv;
            if round_probs {
                dt.round(p)
            } else {
                p
            }
        })
        .collect()
}

/// Top-k of `p` by value, ties → lower index, in descending order; then the weights:
/// `renorm`: r(p / r(Σ_f32 p in list order)) (no rounding when not `round_probs`), else p.
pub fn topk_weights(dt: DType, p: &[f32], k: usize, round_probs: bool, renorm: bool) -> (Vec<u32>, Vec<f32>) {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    let ids: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
    let top: Vec<f32> = order[..k].iter().map(|&i| p[i]).collect();
    if !renorm {
        return (ids, top);
    }
    let mut s = 0.0f32;
    for &v in &top {
        s += v;
    }
    let rnd = |v: f32| if round_probs { dt.round(v) } else { v };
    let s = rnd(s);
    (ids, top.iter().map(|&v| rnd(v / s)).collect())
}
