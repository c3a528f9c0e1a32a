//! CPU reference ops with MLX's CPU semantics.
//!
//! Each function reproduces the op sequence that mlx / mlx-lm run on the CPU,
//! including where results are rounded to the array dtype, the accumulation
//! dtype and the accumulation order (see docs/architecture.md, "Rounding").
//! Values are f32 carriers of `dtype` values.

use crate::{mlx_math, DType};

/// `mx.fast.rms_norm(x, weight, eps)` over rows of `weight.len()`; MLX's CPU
/// fallback: f32 sum of squares in order, mean = sum * (1/n), `1/sqrt`, round
/// to dtype, then multiply by the weight and round again.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, dtype: DType) -> Vec<f32> {
    let d = weight.len();
    let inv_n = (1.0f64 / d as f64) as f32;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mut sum = 0.0f32;
        for &v in row {
            sum += v * v;
        }
        let r = 1.0f32 / (sum * inv_n + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(&v, &w)| dtype.round(dtype.round(v * r) * w)));
    }
    out
}

/// Non-traditional RoPE tables (`mx.fast.rope` fallback) for positions
/// `offset..offset+len`: returns (cos, sin), each `[len, dims/2]`, rounded to dtype.
pub fn rope_tables(dims: usize, base: f32, scale: f32, offset: usize, len: usize, dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let half = dims / 2;
    let step = base.ln() / half as f32;
    let inv_freqs: Vec<f32> = (0..half).map(|i| mlx_math::exp(-(i as f32) * step)).collect();
    let mut coss = Vec::with_capacity(len * half);
    let mut sins = Vec::with_capacity(len * half);
    for t in 0..len {
        let pos = (t as f32 + offset as f32) * scale;
        for &f in &inv_freqs {
            let theta = pos * f;
            coss.push(dtype.round(mlx_math::cos(theta)));
            sins.push(dtype.round(mlx_math::sin(theta)));
        }
    }
    (coss, sins)
}

/// Apply non-traditional RoPE in place to rows of `head_dim` laid out as
/// `[heads, len, head_dim]`, rotating the first `dims` features.
pub fn rope_apply(x: &mut [f32], head_dim: usize, dims: usize, len: usize, coss: &[f32], sins: &[f32], dtype: DType) {
    let half = dims / 2;
    for (i, row) in x.chunks_exact_mut(head_dim).enumerate() {
        let t = i % len;
        let (c, s) = (&coss[t * half..(t + 1) * half], &sins[t * half..(t + 1) * half]);
        for j in 0..half {
            let (x1, x2) = (row[j], row[j + half]);
            row[j] = dtype.round(dtype.round(x1 * c[j]) - dtype.round(x2 * s[j]));
            row[j + half] = dtype.round(dtype.round(x1 * s[j]) + dtype.round(x2 * c[j]));
        }
    }
}

/// `mx.softmax(x, precise=True)` over one row: f32 max, MLX exp, f32 sum in
/// order, reciprocal, then `exp(x - max) * (1/sum)` rounded to dtype.
pub fn softmax_precise(row: &mut [f32], dtype: DType) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for &v in row.iter() {
        sum += mlx_math::exp(v - max);
    }
    let inv = 1.0f32 / sum;
    for v in row.iter_mut() {
        *v = dtype.round(mlx_math::exp(*v - max) * inv);
    }
}

/// `mx.logsumexp` over one row (f32 accumulation, libm log), rounded to dtype.
pub fn logsumexp(row: &[f32], dtype: DType) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max.is_infinite() {
        return dtype.round(max);
    }
    let mut sum = 0.0f32;
    for &v in row {
        sum += mlx_math::exp(v - max);
    }
    dtype.round(sum.ln() + max)
}

/// `mx.argmax` over one row: the first index of the maximum.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// `mx.sum` over one axis on the CPU, for an array of `dtype`.
///
/// Despite the name, MLX 0.32.4 (commit e9ebf7c2, "Accumulate low-precision float
/// reductions in float32 on the CPU") does not add float16/bfloat16 values in
/// their own dtype: `reduce_dispatch_sum_prod` reduces into an f32 accumulator,
/// in element order starting from 0.0 (also for a strided axis, e.g.
/// `sum(axis=-2)`), and rounds to the dtype once at the end.
pub fn sum_in_dtype(values: impl IntoIterator<Item = f32>, dtype: DType) -> f32 {
    dtype.round(values.into_iter().fold(0.0f32, |acc, v| acc + v))
}

/// `x @ w.T` for an unquantized `w` of shape `[n, k]` and `x` of shape `[m, k]`:
/// MLX's CPU gemm for f16/bf16 (`simd_gemm`, 16x16 blocks, simd width 1 on
/// x86) accumulates each output in f32 in k order from 0, then rounds once.
/// f32 goes to `cblas_sgemm`; the Linux mlx-cpu wheel bundles netlib's
/// reference BLAS, whose sgemm also accumulates each output in k order from 0
/// (no FMA), so f32 matches bit for bit there too. Another BLAS would not.
pub fn matmul_t(x: &[f32], w: &[f32], k: usize, dtype: DType) -> Vec<f32> {
    let n = w.len() / k;
    let mut out = Vec::with_capacity(x.len() / k * n);
    for xr in x.chunks_exact(k) {
        for wr in w.chunks_exact(k) {
            let mut acc = 0.0f32;
            for (a, b) in xr.iter().zip(wr) {
                acc += a * b;
            }
            out.push(dtype.round(acc));
        }
    }
    out
}

/// `mx.fast.scaled_dot_product_attention` on the CPU (MLX's fallback):
/// `q` is `[n_heads, l, d]`, `k`/`v` are `[n_kv_heads, s, d]`; query row `i`
/// sits at position `s - l + i` and, when `causal`, sees keys up to there.
/// q is scaled by `scale` rounded to the dtype; scores and the output are
/// gemms (f32 accumulation in order, rounded once); softmax is precise.
pub fn sdpa(q: &[f32], k: &[f32], v: &[f32], n_heads: usize, n_kv_heads: usize, l: usize, d: usize, scale: f32, causal: bool, dtype: DType) -> Vec<f32> {
    let s = k.len() / (n_kv_heads * d);
    let repeats = n_heads / n_kv_heads;
    let scale = dtype.round(scale);
    let mut out = vec![0.0f32; n_heads * l * d];
    let mut scores = vec![0.0f32; s];
    for h in 0..n_heads {
        let kv = h / repeats;
        let kh = &k[kv * s * d..(kv + 1) * s * d];
        let vh = &v[kv * s * d..(kv + 1) * s * d];
        for i in 0..l {
            let qrow: Vec<f32> = q[(h * l + i) * d..(h * l + i + 1) * d].iter().map(|&x| dtype.round(scale * x)).collect();
            let visible = if causal { s - l + i + 1 } else { s };
            for (j, score) in scores.iter_mut().enumerate() {
                *score = if j < visible {
                    let mut acc = 0.0f32;
                    for (a, b) in qrow.iter().zip(&kh[j * d..(j + 1) * d]) {
                        acc += a * b;
                    }
                    dtype.round(acc)
                } else {
                    // `where(mask, scores, finfo(dtype).min)`; exp of it is exactly 0.
                    min_value(dtype)
                };
            }
            softmax_precise(&mut scores, dtype);
            let orow = &mut out[(h * l + i) * d..(h * l + i + 1) * d];
            for (c, o) in orow.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (j, &p) in scores.iter().enumerate() {
                    acc += p * vh[j * d + c];
                }
                *o = dtype.round(acc);
            }
        }
    }
    out
}

/// `finfo(dtype).min`.
pub fn min_value(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => f32::from_bits(0xFF7F_0000),
        DType::F16 => -65504.0,
        _ => f32::MIN,
    }
}

/// The "noaux_tc" sigmoid gating of DeepSeek-V3, Kimi-K2 and GLM-4.x MoE (config.json:
/// `num_experts_per_tok`, `n_group`, `topk_group`, `routed_scaling_factor`, `norm_topk_prob`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupGating {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
}

/// The order the selected experts are listed in (and so summed in, for the normalisation and
/// by the expert combine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectOrder {
    /// MLX's CPU `argpartition` order (libstdc++ introselect): what mlx-lm computes on the CPU.
    Mlx,
    /// Descending score, ties by lower index: what a GPU kernel can compute in parallel
    /// (the CUDA `group_topk` kernel); the same set and, up to the sum order, the same weights.
    Descending,
}

/// mlx-lm's `group_expert_select` on the CPU, bit for bit with [`SelectOrder::Mlx`]:
/// `p = sigmoid(f32(gates))`, the selection score `s = p + bias` (bias: `e_score_correction_bias`,
/// it only chooses); with `n_group > 1` the experts are cut into `n_group` groups and the
/// `n_group - topk_group` groups whose two largest scores sum lowest (argpartition) get score 0;
/// the `top_k` experts are then `argpartition(-s, top_k - 1)[..top_k]`, listed in `order`; their
/// weights are `p[id]`, divided by their f32 sum in list order when `top_k > 1` and
/// `norm_topk_prob`, times `routed_scaling_factor`. All arithmetic in f32, as mlx-lm's.
/// Returns (expert ids, weights).
pub fn group_expert_select(gates: &[f32], bias: &[f32], g: &GroupGating, order: SelectOrder) -> (Vec<u32>, Vec<f32>) {
    let GroupGating { top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob } = *g;
    let e = gates.len();
    assert!(bias.len() == e && top_k >= 1 && top_k <= e && n_group >= 1 && e % n_group == 0 && topk_group <= n_group, "group_expert_select: bad shape");
    let probs: Vec<f32> = gates.iter().map(|&g| crate::mlx_math::sigmoid(DType::F32, g)).collect();
    let mut scores: Vec<f32> = probs.iter().zip(bias).map(|(p, b)| p + b).collect();
    if n_group > 1 {
        let per = e / n_group;
        // `mx.topk(scores, 2).sum()`: the two largest of each group (their order does not
        // change an f32 sum of two).
        let group_scores: Vec<f32> = scores
            .chunks_exact(per)
            .map(|g| {
                let mut top = [f32::NEG_INFINITY; 2];
                for &v in g {
                    if v > top[0] {
                        top = [v, top[0]];
                    } else if v > top[1] {
                        top[1] = v;
                    }
                }
                if per == 1 { top[0] } else { top[0] + top[1] }
            })
            .collect();
        let dropped = n_group - topk_group;
        if dropped > 0 {
            for &g in &argpartition(&group_scores, dropped - 1)[..dropped] {
                scores[g as usize * per..(g as usize + 1) * per].fill(0.0);
            }
        }
    }
    let neg: Vec<f32> = scores.iter().map(|&v| -v).collect();
    let mut ids = argpartition(&neg, top_k - 1)[..top_k].to_vec();
    if order == SelectOrder::Descending {
        // IEEE comparison (-0 == +0, as the GPU compares), ties by index; NaN scores: unspecified.
        ids.sort_by(|&a, &b| scores[b as usize].partial_cmp(&scores[a as usize]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    }
    let mut weights: Vec<f32> = ids.iter().map(|&i| probs[i as usize]).collect();
    if top_k > 1 && norm_topk_prob {
        let denominator = sum_in_dtype(weights.iter().copied(), DType::F32);
        weights.iter_mut().for_each(|w| *w /= denominator);
    }
    weights.iter_mut().for_each(|w| *w *= routed_scaling_factor);
    (ids, weights)
}

/// `mx.argpartition(values, kth)` on the CPU: MLX runs libstdc++'s
/// `std::nth_element` (introselect) over an iota of indices. The order of the
/// returned indices is that algorithm's, and it matters: mlx-lm sums the
/// selected experts in this order.
///
/// The comparator (mlx/backend/cpu/sort.cpp) sends NaNs last and breaks ties
/// by index: `v[a] < v[b] || (v[a] == v[b] && a < b)`. Ties are common for
/// bf16 router probabilities, and without the index tie-break the order of
/// equal values differs from MLX's.
pub fn argpartition(values: &[f32], kth: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if values.is_empty() || kth >= values.len() {
        return idx;
    }
    let less = |a: u32, b: u32| {
        let (va, vb) = (values[a as usize], values[b as usize]);
        if va.is_nan() {
            return false;
        }
        if vb.is_nan() {
            return true;
        }
        va < vb || (va == vb && a < b)
    };
    let n = idx.len();
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    nth_element::introselect(&mut idx, 0, kth, n, depth, &less);
    idx
}

/// A transcription of libstdc++'s `nth_element` helpers (bits/stl_algo.h,
/// stl_heap.h) over index ranges `[first, last)`.
mod nth_element {
    pub fn introselect<F: Fn(u32, u32) -> bool>(v: &mut [u32], mut first: usize, nth: usize, mut last: usize, mut depth: usize, less: &F) {
        while last - first > 3 {
            if depth == 0 {
                heap_select(v, first, nth + 1, last, less);
                v.swap(first, nth);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(v, first, last, less);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        insertion_sort(v, first, last, less);
    }

    fn unguarded_partition_pivot<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, last: usize, less: &F) -> usize {
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1, less);
        unguarded_partition(v, first + 1, last, first, less)
    }

    fn move_median_to_first<F: Fn(u32, u32) -> bool>(v: &mut [u32], result: usize, a: usize, b: usize, c: usize, less: &F) {
        let pick = if less(v[a], v[b]) {
            if less(v[b], v[c]) {
                b
            } else if less(v[a], v[c]) {
                c
            } else {
                a
            }
        } else if less(v[a], v[c]) {
            a
        } else if less(v[b], v[c]) {
            c
        } else {
            b
        };
        v.swap(result, pick);
    }

    fn unguarded_partition<F: Fn(u32, u32) -> bool>(v: &mut [u32], mut first: usize, mut last: usize, pivot: usize, less: &F) -> usize {
        loop {
            while less(v[first], v[pivot]) {
                first += 1;
            }
            last -= 1;
            while less(v[pivot], v[last]) {
                last -= 1;
            }
            if first >= last {
                return first;
            }
            v.swap(first, last);
            first += 1;
        }
    }

    fn insertion_sort<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, last: usize, less: &F) {
        if first == last {
            return;
        }
        for i in first + 1..last {
            let val = v[i];
            if less(val, v[first]) {
                v.copy_within(first..i, first + 1);
                v[first] = val;
            } else {
                let mut j = i;
                while less(val, v[j - 1]) {
                    v[j] = v[j - 1];
                    j -= 1;
                }
                v[j] = val;
            }
        }
    }

    fn heap_select<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, middle: usize, last: usize, less: &F) {
        make_heap(v, first, middle, less);
        for i in middle..last {
            if less(v[i], v[first]) {
                pop_heap(v, first, middle, i, less);
            }
        }
    }

    fn make_heap<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, last: usize, less: &F) {
        let len = last - first;
        if len < 2 {
            return;
        }
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[first + parent];
            adjust_heap(v, first, parent, len, value, less);
            if parent == 0 {
                return;
            }
            parent -= 1;
        }
    }

    fn pop_heap<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, last: usize, result: usize, less: &F) {
        let value = v[result];
        v[result] = v[first];
        adjust_heap(v, first, 0, last - first, value, less);
    }

    fn adjust_heap<F: Fn(u32, u32) -> bool>(v: &mut [u32], first: usize, mut hole: usize, len: usize, value: u32, less: &F) {
        let top = hole;
        let mut child = hole;
        while child < (len - 1) / 2 {
            child = 2 * (child + 1);
            if less(v[first + child], v[first + child - 1]) {
                child -= 1;
            }
            v[first + hole] = v[first + child];
            hole = child;
        }
        if len & 1 == 0 && child == (len - 2) / 2 {
            child = 2 * (child + 1);
            v[first + hole] = v[first + child - 1];
            hole = child - 1;
        }
        // push_heap
        let mut parent = if hole > 0 { (hole - 1) / 2 } else { 0 };
        while hole > top && less(v[first + parent], value) {
            v[first + hole] = v[first + parent];
            hole = parent;
            parent = if hole > 0 { (hole - 1) / 2 } else { 0 };
        }
        v[first + hole] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argpartition_partitions() {
        let mut s = 99u32;
        for n in [1usize, 2, 3, 4, 5, 8, 16, 60, 128, 257] {
            for _ in 0..50 {
                let vals: Vec<f32> = (0..n)
                    .map(|_| {
                        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                        ((s >> 8) % 17) as f32 // many ties
                    })
                    .collect();
                let kth = (s as usize) % n;
                let idx = argpartition(&vals, kth);
                let mut sorted = idx.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
                let pivot = vals[idx[kth] as usize];
                assert!(idx[..kth].iter().all(|&i| vals[i as usize] <= pivot));
                assert!(idx[kth + 1..].iter().all(|&i| vals[i as usize] >= pivot));
            }
        }
    }

    #[test]
    fn rms_norm_matches_formula_in_f32() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let w: Vec<f32> = (0..32).map(|i| 0.5 + i as f32 * 0.01).collect();
        let out = rms_norm(&x, &w, 1e-6, DType::F32);
        for r in 0..2 {
            let row = &x[r * 32..(r + 1) * 32];
            let ms: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / 32.0;
            for j in 0..32 {
                let want = row[j] as f64 / (ms + 1e-6).sqrt() * w[j] as f64;
                assert!((out[r * 32 + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
