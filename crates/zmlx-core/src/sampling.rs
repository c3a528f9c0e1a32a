//! Token sampling, defined once for the CPU and the GPU (the `smp_*` CUDA kernels compute the
//! same integers bit for bit), so a seed gives the same token on both wherever the logprobs
//! agree.
//!
//! The filters are mlx-lm's `make_sampler`, in its order: top-p on the probabilities at
//! temperature 1 (every token whose logprob ties the threshold is kept), then min-p (tokens
//! below the best logprob + ln(min_p), that sum rounded to the logprobs' dtype as MLX does),
//! then top-k (ties at the k-th value keep the lowest indices), then a categorical draw at the
//! temperature. Two choices make it exact and order-free on a GPU:
//! - **Fixed-point weights.** A token's weight is `round(e^x · 2^40)`, x its logprob minus the
//!   largest one (divided by the temperature for the draw), with an `e^x` made of correctly
//!   rounded f64 + − × only ([`det_exp`]): no libm, no FMA, the same bits everywhere. Sums are
//!   u64 integers, exact in any order. Tokens below e^-28.4 of the best weigh 0.
//! - **The draw walks the vocabulary in index order**: `d = ⌊r · W / 2^64⌋` for the step's random
//!   word r and the kept mass W; the token is the first index whose running kept mass exceeds d.
//!   Each kept token is drawn with probability weight/W, as in any categorical draw, and the
//!   GPU needs prefix sums, not a sort.
//!
//! The random word of a step is [`step_random`]`(seed, position)`: no generator state, so a
//! step enqueued ahead of time on a GPU draws what the CPU would.

use crate::{ops, DType};

/// Fixed-point weights are `e^x · 2^WEIGHT_BITS`; the best token weighs exactly 2^40.
pub const WEIGHT_BITS: i32 = 40;

/// What to sample with (temp > 0; `zmlx generate --temp --top-p --top-k`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub temp: f32,
    /// Nucleus mass in (0, 1); 1 (or anything outside (0, 1)) keeps every token, as mlx-lm.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Min-p in (0, 1]: keep tokens whose probability is at least min_p times the best one's;
    /// 0 keeps every token, as mlx-lm.
    pub min_p: f32,
}

impl SampleParams {
    /// `top_p` as a 64-bit fraction ⌊p · 2^64⌋, or 0 when top-p is off.
    pub fn top_p_fixed(&self) -> u64 {
        if self.top_p > 0.0 && self.top_p < 1.0 {
            (self.top_p as f64 * 18446744073709551616.0) as u64
        } else {
            0
        }
    }

    /// mlx-lm's `math.log(min_p)` as the scalar MLX adds to a `dtype` array (rounded to the
    /// dtype); None when min-p is off. The device sampler takes this value.
    pub fn min_p_log(&self, dtype: DType) -> Option<f32> {
        (self.min_p > 0.0 && self.min_p <= 1.0).then(|| dtype.round((self.min_p as f64).ln() as f32))
    }

    /// The lowest logprob min-p keeps, for logprobs of `dtype` whose maximum is `max`: mlx-lm's
    /// `max + math.log(min_p)`, the sum rounded to the dtype too (MLX computes a bf16/f16 add in
    /// f32 and rounds). None when min-p is off.
    pub fn min_p_threshold(&self, max: f32, dtype: DType) -> Option<f32> {
        self.min_p_log(dtype).map(|l| dtype.round(max + l))
    }

    /// Whether top-k removes anything from `n` tokens.
    pub fn top_k_active(&self, n: usize) -> bool {
        self.top_k > 0 && self.top_k < n
    }
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `i` of the counter-based stream `seed`: SplitMix64 output `i` from the start
/// `mix64(seed)` (also the dummy-weight fills' stream).
pub fn stream_hash(seed: u64, i: u64) -> u64 {
    mix64(mix64(seed).wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// The random word for the token sampled after the token at `position` (0-based).
pub fn step_random(seed: u64, position: u64) -> u64 {
    stream_hash(seed, position)
}

/// Order key of a logprob: larger value, larger key (the f32 order; NaN → 0, below -inf).
pub fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return 0;
    }
    let u = v.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// 1/k! for k = 0..=13 (f64 bits), the Taylor coefficients of [`det_exp`].
const INV_FACT: [u64; 14] = [
    0x3ff0000000000000,
    0x3ff0000000000000,
    0x3fe0000000000000,
    0x3fc5555555555555,
    0x3fa5555555555555,
    0x3f81111111111111,
    0x3f56c16c16c16c17,
    0x3f2a01a01a01a01a,
    0x3efa01a01a01a01a,
    0x3ec71de3a556c734,
    0x3e927e4fb7789f5c,
    0x3e5ae64567f544e4,
    0x3e21eed8eff8d898,
    0x3de6124613a86d09,
];
/// ln 2 split so that k · LN2_HI is exact for |k| < 2^11 (fdlibm's constants), and 1/ln 2.
const LN2_HI: u64 = 0x3fe62e42fee00000;
const LN2_LO: u64 = 0x3dea39ef35793c76;
const LOG2_E: u64 = 0x3ff71547652b82fe;

/// e^x for x ≤ 0 from correctly rounded f64 operations only (≤ 2 ulp from the true value),
/// identical on the host and the device; 0 below -700. x = k·ln 2 + r with |r| ≤ ln2/2, e^r
/// by its Taylor polynomial to degree 13 (error < 1e-17), each step one f64 multiply then one
/// add (the kernels use __dmul_rn / __dadd_rn: no FMA), then the exact scale 2^k.
pub fn det_exp(x: f64) -> f64 {
    if x.is_nan() || x < -700.0 {
        return 0.0;
    }
    let x = x.min(0.0);
    let f = f64::from_bits;
    let k = (x * f(LOG2_E) + 0.5).floor();
    let r = (x - k * f(LN2_HI)) - k * f(LN2_LO);
    let mut p = f(INV_FACT[13]);
    for c in INV_FACT[..13].iter().rev() {
        p = p * r + f(*c);
    }
    // k ≥ -1010 above x = -700: 2^k is a normal number.
    p * pow2(k as i32)
}

/// 2^e for a normal exponent, exactly.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// round(e^x · 2^40) (ties to even) for x ≤ 0; 0 for NaN and for weights below 1/2.
pub fn fixed_weight(x: f64) -> u64 {
    // e^x · 2^40 < 1/2 below x = -(40 + 1)·ln 2 ≈ -28.42.
    if x.is_nan() || x < -29.0 {
        return 0;
    }
    // Both scalings are by powers of two within the normal range, so this is the device's
    // p · 2^(k+40) bit for bit.
    (det_exp(x) * pow2(WEIGHT_BITS)).round_ties_even() as u64
}

/// ⌈q · p / 2^64⌉: the mass the nucleus must reach.
pub fn nucleus_target(total: u64, top_p_fixed: u64) -> u64 {
    let prod = total as u128 * top_p_fixed as u128;
    ((prod >> 64) as u64) + ((prod as u64 != 0) as u64)
}

/// ⌊r · w / 2^64⌋ ∈ [0, w).
pub fn draw_target(r: u64, w: u64) -> u64 {
    ((r as u128 * w as u128) >> 64) as u64
}

/// The sampled token for `logprobs` (mlx-lm's `logits - logsumexp`, values of `dtype`), random
/// word `r`. temp ≤ 0 gives the greedy token (`ops::argmax`, as `Decoder::forward_greedy`); a row
/// without a finite maximum (a NaN or +inf logit upstream) gives token 0, as the GPU's
/// `logprobs_argmax` does.
pub fn sample(logprobs: &[f32], dtype: DType, p: &SampleParams, r: u64) -> u32 {
    sample_traced(logprobs, dtype, p, r).token
}

/// A sampled token with the integers that chose it (what the GPU kernels report).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Σ of the temperature-1 weights (0 when top-p is off).
    pub nucleus_total: u64,
    /// The nucleus' lowest kept key (0: top-p off) and the k-th key (0: top-k off).
    pub v_p: u32,
    pub v_k: u32,
    /// The kept tokens' weight at the temperature, and the draw in [0, it).
    pub kept_mass: u64,
    pub d: u64,
}

/// [`sample`] with its intermediate integers.
pub fn sample_traced(logprobs: &[f32], dtype: DType, p: &SampleParams, r: u64) -> Sampled {
    if p.temp <= 0.0 || p.temp.is_nan() {
        return Sampled { token: ops::argmax(logprobs) as u32, ..Default::default() };
    }
    let Some(f) = filter(logprobs, dtype, p) else {
        return Sampled::default();
    };
    let m = f.max as f64;
    let temp = p.temp as f64;
    let weight = |v: f32| fixed_weight(if temp == 1.0 { v as f64 - m } else { (v as f64 - m) / temp });
    let w: Vec<u64> = logprobs.iter().zip(&f.kept).map(|(&v, &k)| if k { weight(v) } else { 0 }).collect();
    let mut out = Sampled { nucleus_total: f.nucleus_total, v_p: f.v_p, v_k: f.v_k, ..Default::default() };
    out.kept_mass = w.iter().sum();
    out.d = draw_target(r, out.kept_mass);
    let mut cum = 0u64;
    for (i, &wi) in w.iter().enumerate() {
        cum += wi;
        if cum > out.d {
            out.token = i as u32;
            return out;
        }
    }
    unreachable!("the kept mass exceeds d by construction")
}

/// Which tokens mlx-lm's filters keep (top-p, then min-p, then top-k) for `logprobs` of
/// `dtype` (every token when no filter is on); None when no logprob is finite.
pub fn kept_tokens(logprobs: &[f32], dtype: DType, p: &SampleParams) -> Option<Vec<bool>> {
    filter(logprobs, dtype, p).map(|f| f.kept)
}

struct Filtered {
    kept: Vec<bool>,
    max: f32,
    nucleus_total: u64,
    v_p: u32,
    v_k: u32,
}

/// top-p (when `top_p_fixed` != 0): the temperature-1 mass Q and the key where the walk along
/// `order` (key desc, index asc) first reaches ⌈p·Q⌉; every token with that key is kept.
fn nucleus(logprobs: &[f32], m: f32, key: &[u32], order: &[usize], top_p_fixed: u64) -> (u64, u32) {
    if top_p_fixed == 0 {
        return (0, 0);
    }
    let q: Vec<u64> = logprobs.iter().map(|&v| fixed_weight(v as f64 - m as f64)).collect();
    let total = q.iter().sum();
    let target = nucleus_target(total, top_p_fixed);
    let mut cum = 0u64;
    for &i in order {
        cum += q[i];
        if cum >= target {
            return (total, key[i]);
        }
    }
    (total, 0)
}

/// The largest logprob (None when it is not finite: nothing to sample) and every token's
/// order key.
fn max_and_keys(logprobs: &[f32]) -> Option<(f32, Vec<u32>)> {
    let m = logprobs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m.is_finite().then(|| (m, logprobs.iter().map(|&v| order_key(v)).collect()))
}

/// The vocabulary is sorted only when top-p or top-k needs the order (temperature and min-p
/// alone are thresholds).
fn filter(logprobs: &[f32], dtype: DType, p: &SampleParams) -> Option<Filtered> {
    let n = logprobs.len();
    let (m, key) = max_and_keys(logprobs)?;
    let pfix = p.top_p_fixed();
    // Tokens in (key desc, index asc) order, when a filter needs it.
    let order: Vec<usize> = if pfix != 0 || p.top_k_active(n) {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by(|&a, &b| key[b].cmp(&key[a]).then(a.cmp(&b)));
        order
    } else {
        Vec::new()
    };
    let (nucleus_total, v_p) = nucleus(logprobs, m, &key, &order, pfix);
    // min-p: a value threshold too, so top-p's and min-p's survivors are a prefix of the order.
    let lowest = p.min_p_threshold(m, dtype).map_or(v_p, |t| v_p.max(order_key(t)));
    // top-k: the first k of the order (ties at the k-th value: lowest indices); among the
    // survivors of the prefix, that is the prefix cut at k.
    if !p.top_k_active(n) {
        return Some(Filtered { kept: key.iter().map(|&k| k >= lowest).collect(), max: m, nucleus_total, v_p, v_k: 0 });
    }
    let v_k = key[order[p.top_k - 1]];
    let mut kept = vec![false; n];
    for &i in order.iter().take_while(|&&i| key[i] >= lowest).take(p.top_k) {
        kept[i] = true;
    }
    Some(Filtered { kept, max: m, nucleus_total, v_p, v_k })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn det_exp_is_exp() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -(i as f64) * 0.00037 - (i % 7) as f64 * 1e-9;
            let (a, b) = (det_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-16, "det_exp relative error {worst:e}");
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(fixed_weight(0.0), 1 << 40);
        assert_eq!(fixed_weight(-30.0), 0);
        assert_eq!(fixed_weight(f64::NAN), 0);
        let at = |x: f64| (x.exp() * (1u64 << 40) as f64).round() as u64;
        for x in [-1e-9, -0.5, -3.25, -17.0, -28.0] {
            assert!(fixed_weight(x).abs_diff(at(x)) <= 1, "fixed_weight({x})");
        }
    }

    fn lcg(s: &mut u64) -> u64 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *s
    }

    /// An independent float implementation of mlx-lm's filters (sort, f64 softmax, cumulative
    /// sums): the probability of each token.
    fn probabilities(lp: &[f32], p: &SampleParams) -> Vec<f64> {
        let n = lp.len();
        let m = lp.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
        let mut keep = vec![true; n];
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let pr: Vec<f64> = lp.iter().map(|&v| (v as f64 - m).exp()).collect();
            let total: f64 = pr.iter().sum();
            let mut cum = 0.0;
            let mut thr = f32::NEG_INFINITY;
            for &i in &idx {
                cum += pr[i];
                if cum >= p.top_p as f64 * total {
                    thr = lp[i];
                    break;
                }
            }
            (0..n).for_each(|i| keep[i] = lp[i] >= thr);
        }
        if p.min_p > 0.0 {
            // mlx-lm: logprobs < max + ln(min_p) are removed (f32 logprobs: no rounding).
            let t = m as f32 + (p.min_p as f64).ln() as f32;
            (0..n).for_each(|i| keep[i] = keep[i] && lp[i] >= t);
        }
        if p.top_k > 0 {
            let mut seen = 0;
            for &i in &idx {
                if keep[i] {
                    seen += 1;
                    keep[i] = seen <= p.top_k;
                }
            }
        }
        let e: Vec<f64> = (0..n).map(|i| if keep[i] { ((lp[i] as f64 - m) / p.temp as f64).exp() } else { 0.0 }).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn frequencies_follow_mlx_lm_filters() {
        let mut s = 12345u64;
        // Logprobs with ties (a coarse grid) so that top-p and top-k boundaries fall on ties.
        let lp: Vec<f32> = (0..40).map(|_| -(((lcg(&mut s) >> 40) % 24) as f32) * 0.25).collect();
        for params in [
            SampleParams { temp: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0 },
            SampleParams { temp: 0.6, top_p: 0.8, top_k: 0, min_p: 0.0 },
            SampleParams { temp: 1.7, top_p: 1.0, top_k: 5, min_p: 0.0 },
            SampleParams { temp: 0.9, top_p: 0.5, top_k: 3, min_p: 0.0 },
            SampleParams { temp: 1.2, top_p: 1.0, top_k: 0, min_p: 0.05 },
            SampleParams { temp: 0.8, top_p: 0.9, top_k: 6, min_p: 0.02 },
        ] {
            let want = probabilities(&lp, &params);
            let draws = 200_000;
            let mut count = vec![0usize; lp.len()];
            for _ in 0..draws {
                count[sample(&lp, DType::F32, &params, lcg(&mut s)) as usize] += 1;
            }
            for i in 0..lp.len() {
                let f = count[i] as f64 / draws as f64;
                let sd = (want[i] * (1.0 - want[i]) / draws as f64).sqrt();
                assert!((f - want[i]).abs() <= 5.0 * sd + 1e-9, "{params:?}: token {i} drawn {f}, expected {}", want[i]);
            }
            assert!(want.iter().filter(|&&p| p > 0.0).count() > 1, "{params:?} keeps one token: a weak test");
        }
    }

    #[test]
    fn limits() {
        let lp = [-2.0f32, -0.5, -0.5, f32::NAN, -9.0];
        let f = DType::F32;
        let params = |top_p: f32, top_k: usize, min_p: f32| SampleParams { temp: 1.0, top_p, top_k, min_p };
        let greedy = params(1.0, 1, 0.0);
        for r in [0, u64::MAX / 3, u64::MAX] {
            // top-k 1 keeps the lowest index among the tied maxima
            assert_eq!(sample(&lp, f, &greedy, r), 1);
            // a tiny nucleus keeps the maximum and its ties; so does min-p 1
            let t = sample(&lp, f, &params(1e-6, 0, 0.0), r);
            assert!(t == 1 || t == 2);
            let t = sample(&lp, f, &params(1.0, 0, 1.0), r);
            assert!(t == 1 || t == 2);
        }
        // min-p 0.2: -2.0 >= -2.109 is kept; min-p 0.3: -0.5 + ln 0.3 = -1.70 removes it
        assert_eq!(sample(&lp, f, &params(1.0, 0, 0.2), 0), 0);
        assert_eq!(sample(&lp, f, &params(1.0, 0, 0.3), 0), 1);
        assert_eq!(sample(&lp, f, &SampleParams { temp: 0.0, ..greedy }, 7), 1);
        assert_eq!(sample(&[f32::NAN, f32::NAN], f, &greedy, 7), 0);
        assert_eq!(sample(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY], f, &greedy, 7), 0);
        // r = 0 takes the first kept index, r = max the last
        let all = params(1.0, 0, 0.0);
        assert_eq!(sample(&lp, f, &all, 0), 0);
        assert_eq!(sample(&lp, f, &all, u64::MAX), 4);
    }

    /// The filters as first written and verified against the device kernels (2026-12-06): a
    /// walk over the whole sorted vocabulary, always. `filter` must agree exactly.
    fn filter_by_sort(logprobs: &[f32], dtype: DType, p: &SampleParams) -> Option<Filtered> {
        let n = logprobs.len();
        let (m, key) = max_and_keys(logprobs)?;
        // Tokens in (key desc, index asc) order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| key[b].cmp(&key[a]).then(a.cmp(&b)));
        let (nucleus_total, v_p) = nucleus(logprobs, m, &key, &order, p.top_p_fixed());
        let mut v_k = 0;
        // min-p: a value threshold too, so top-p's and min-p's survivors are a prefix of the order.
        let lowest = p.min_p_threshold(m, dtype).map_or(v_p, |t| v_p.max(order_key(t)));
        // top-k: the first k of the order (ties at the k-th value: lowest indices); among the
        // survivors of the prefix, that is the prefix cut at k.
        let limit = if p.top_k_active(n) {
            v_k = key[order[p.top_k - 1]];
            p.top_k
        } else {
            n
        };
        let mut kept = vec![false; n];
        for &i in order.iter().take_while(|&&i| key[i] >= lowest).take(limit) {
            kept[i] = true;
        }
        Some(Filtered { kept, max: m, nucleus_total, v_p, v_k })
    }

    #[test]
    fn filter_equals_the_sorted_walk() {
        let mut s = 777u64;
        for case in 0..600 {
            let n = 1 + (lcg(&mut s) >> 40) as usize % 3000;
            // coarse grids give ties everywhere; some rows hold -inf / NaN
            let grid = [0.25f32, 0.125, 1e-3, 2.0][case % 4];
            let lp: Vec<f32> = (0..n)
                .map(|_| match (lcg(&mut s) >> 40) % 50 {
                    0 => f32::NEG_INFINITY,
                    1 if case % 7 == 0 => f32::NAN,
                    _ => -(((lcg(&mut s) >> 40) % 80) as f32) * grid,
                })
                .collect();
            let pick = |s: &mut u64, xs: &[f32]| xs[(lcg(s) >> 40) as usize % xs.len()];
            let params = SampleParams {
                temp: 1.0,
                top_p: pick(&mut s, &[1.0, 0.9, 0.5, 0.05, 1e-6]),
                top_k: [0, 1, 3, 40, n, n + 1][(lcg(&mut s) >> 40) as usize % 6],
                min_p: pick(&mut s, &[0.0, 0.0, 0.05, 0.5, 1.0]),
            };
            let dtype = [DType::BF16, DType::F16, DType::F32][case % 3];
            let key = |f: Filtered| (f.kept, f.max.to_bits(), f.nucleus_total, f.v_p, f.v_k);
            assert_eq!(filter(&lp, dtype, &params).map(key), filter_by_sort(&lp, dtype, &params).map(key), "case {case}: n={n} {params:?}");
        }
    }

    #[test]
    fn min_p_threshold_rounds_like_mlx() {
        let p = SampleParams { temp: 1.0, top_p: 1.0, top_k: 0, min_p: 0.1 };
        // bf16: ln 0.1 = -2.302585 -> -2.296875; -0.5 - 2.296875 = -2.796875, a bf16 value
        assert_eq!(p.min_p_threshold(-0.5, DType::BF16), Some(-2.796875));
        assert_eq!(p.min_p_threshold(-0.5, DType::F32), Some(-0.5 + 0.1f64.ln() as f32));
        assert_eq!(SampleParams { min_p: 0.0, ..p }.min_p_threshold(-0.5, DType::BF16), None);
    }
}
