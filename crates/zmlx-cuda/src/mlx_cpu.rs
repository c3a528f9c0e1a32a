//! MLX's CPU numerics on the GPU (kernels/mlx_cpu.cu): the ops whose fast CUDA kernels sum in
//! another order or precision than MLX's CPU backend, redone serially with its exact
//! rounding. A model run with these instead of their fast counterparts (`--numerics mlx-cpu`)
//! gives the CPU reference's logits bit for bit; the remaining ops (embedding, RoPE, SwiGLU,
//! the weighted expert sum, dense matvec, residual add) are bit-exact in their fast kernels.
//! Slow by design (one thread per output, serial loops): for checking, not for serving.

use zmlx_core::DType;

use crate::catalog::dtype_tag;
use crate::ops::{inv, rms_norm_inv_n, AttnShape, QuantWeight};
use crate::runtime::{Arg, CudaDevice};
use crate::Result;

/// Kernel stems of the `mlxcpu_<dtype>` module (`mlxcpu_<stem>_<dtype>`).
pub const KERNELS: [&str; 5] = ["qmm", "rms_norm", "attention", "softmax_topk", "logprobs_argmax"];

/// Most experts [`softmax_topk`] takes (MC_TOPK_MAX_E in mlx_cpu.cu).
pub const TOPK_MAX_EXPERTS: usize = 2048;

/// `mx.quantized_matmul(x, w.T)` for one token as MLX's CPU `_qmm_t` computes it: per output,
/// `sum = r(sum + r(x_k · r(r(scale·q_k) + bias)))` over k in order. With `ids` (u32 in device
/// memory, `slots` of them) the weight is stacked `[E, N, K]` and slot i uses expert ids[i],
/// reading x per slot (`x_per_slot`) or shared; y is `[slots, N]`.
#[allow(clippy::too_many_arguments)]
pub fn qmm(dev: &CudaDevice, dt: DType, wq: &QuantWeight, ids: u64, slots: usize, x: u64, x_per_slot: bool, y: u64) -> Result<()> {
    let tag = dtype_tag(dt)?;
    let [w, s, b] = wq.args();
    let grid = (wq.n.div_ceil(128) as u32, slots.max(1) as u32, 1);
    let x_stride = if x_per_slot { wq.k as i32 } else { 0 };
    let (n, k, bits, gs) = (wq.n as i32, wq.k as i32, wq.bits as i32, wq.group_size as i32);
    dev.launch(&format!("mlxcpu_qmm_{tag}"), grid, (128, 1, 1), 0, &[w, s, b, Arg::Ptr(x), Arg::Ptr(y), Arg::Ptr(ids), Arg::I32(n), Arg::I32(k), Arg::I32(bits), Arg::I32(gs), Arg::I32(x_stride)])
}

/// `mx.fast.rms_norm` as MLX's CPU fallback (zmlx-core `ops::rms_norm`), `rows` rows of `n`.
/// In place allowed.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(dev: &CudaDevice, dt: DType, x: u64, w: u64, y: u64, rows: usize, n: usize, eps: f32) -> Result<()> {
    let tag = dtype_tag(dt)?;
    dev.launch(&format!("mlxcpu_rms_norm_{tag}"), (rows as u32, 1, 1), (128, 1, 1), 0, &[Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(y), Arg::I32(n as i32), Arg::F32(eps), Arg::F32(rms_norm_inv_n(n))])
}

/// Bytes of [`attention`]'s score workspace for a shape.
pub fn attention_workspace_bytes(s: &AttnShape) -> usize {
    s.n_heads * s.max_len * 4
}

/// One query token's attention as MLX's CPU sdpa fallback (zmlx-core `ops::sdpa`): caches
/// `[n_kv, max_len, head_dim]`, length `*len_ptr + len_add`; `workspace`:
/// [`attention_workspace_bytes`].
#[allow(clippy::too_many_arguments)]
pub fn attention(dev: &CudaDevice, dt: DType, s: &AttnShape, q: u64, k_cache: u64, v_cache: u64, len_ptr: u64, len_add: i32, scale: f32, workspace: u64, out: u64) -> Result<()> {
    if s.head_dim > 256 || s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
        return Err(inv(format!("mlx-cpu attention: head_dim {} (≤ 256), heads {}/{} unsupported", s.head_dim, s.n_heads, s.n_kv_heads)));
    }
    let tag = dtype_tag(dt)?;
    let g = (s.n_heads / s.n_kv_heads) as i32;
    dev.launch(
        &format!("mlxcpu_attention_{tag}"),
        (s.n_heads as u32, 1, 1),
        (128, 1, 1),
        0,
        &[Arg::Ptr(q), Arg::Ptr(k_cache), Arg::Ptr(v_cache), Arg::Ptr(out), Arg::Ptr(workspace), Arg::Ptr(len_ptr), Arg::I32(len_add), Arg::I32(g), Arg::I32(s.max_len as i32), Arg::I32(s.head_dim as i32), Arg::F32(scale)],
    )
}

/// mlx-lm's router tail on the CPU: precise softmax over `e` logits, top `k` in
/// `argpartition` order, weights p (or renormalised). ids u32 `[k]`, weights f32 `[k]`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_topk(dev: &CudaDevice, dt: DType, logits: u64, e: usize, k: usize, renorm: bool, ids: u64, weights: u64) -> Result<()> {
    if k == 0 || k > e || e > TOPK_MAX_EXPERTS {
        return Err(inv(format!("mlx-cpu softmax_topk: k={k}, E={e} unsupported (k ≤ E ≤ {TOPK_MAX_EXPERTS})")));
    }
    let tag = dtype_tag(dt)?;
    dev.launch(&format!("mlxcpu_softmax_topk_{tag}"), (1, 1, 1), (1, 1, 1), 0, &[Arg::Ptr(logits), Arg::Ptr(ids), Arg::Ptr(weights), Arg::I32(e as i32), Arg::I32(k as i32), Arg::I32(renorm as i32)])
}

/// mlx-lm's greedy token on the CPU, `argmax(logits - logsumexp(logits))` with its sequential
/// sum (zmlx-core `ops::logsumexp`), as a u32 at `out`.
pub fn logprobs_argmax(dev: &CudaDevice, dt: DType, logits: u64, n: usize, out: u64) -> Result<()> {
    if n == 0 || n >= (1 << 31) {
        return Err(inv(format!("mlx-cpu logprobs_argmax: n={n} unsupported")));
    }
    let tag = dtype_tag(dt)?;
    dev.launch(&format!("mlxcpu_logprobs_argmax_{tag}"), (1, 1, 1), (1, 1, 1), 0, &[Arg::Ptr(logits), Arg::Ptr(out), Arg::I32(n as i32)])
}

/// Device tests: each kernel against zmlx-core's CPU op (itself tested against MLX) on fresh
/// random inputs, outputs poisoned first, compared bit for bit.
pub(crate) mod tests {
    use zmlx_core::{ops as cpu, DType, QuantSpec, QuantizedMatrix};

    use crate::ops::{AttnShape, QuantWeight};
    use crate::reference::Rng;
    use crate::runtime::CudaDevice;
    use crate::selftest::{down, dtn as tag, poisoned, qdata, up, TestRow};
    use crate::Result;

    /// Bitwise comparison (NaN poison never equals a value).
    fn row(name: &str, shape: String, out: &[f32], want: &[f32]) -> TestRow {
        let bad = out.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count() + out.len().abs_diff(want.len());
        let note = if bad == 0 { "bit-exact vs zmlx-core (MLX CPU)".into() } else { format!("{bad} of {} differ", want.len()) };
        TestRow { name: name.into(), shape, passed: bad == 0, worst: 0.0, rel_norm: 0.0, note }
    }

    /// E stacked experts, `slots` of them chosen at random (repeats allowed), x shared or per slot.
    #[allow(clippy::too_many_arguments)]
    fn qmm(dev: &CudaDevice, rng: &mut Rng, dt: DType, e: usize, n: usize, k: usize, bits: u32, gs: usize, slots: usize, per_slot: bool) -> Result<TestRow> {
        let spec = QuantSpec::new(bits, gs).map_err(|err| crate::CudaError::Invalid(err.to_string()))?;
        let wpr = k * bits as usize / 32;
        let groups = n * k / gs;
        let q = qdata(rng, dt, e, n, k, bits, gs);
        let (words, scales, biases) = (&q.words, &q.scales, &q.biases);
        let x = rng.vec(if per_slot { slots * k } else { k }, -1.0, 1.0, dt);
        let ids: Vec<u32> = (0..slots).map(|_| rng.next_u32() % e as u32).collect();
        let (wb, sb, bb, xb, ib) = (dev.upload(words)?, up(dev, dt, scales)?, up(dev, dt, biases)?, up(dev, dt, &x)?, dev.upload(&ids)?);
        let yb = poisoned(dev, slots * n * dt.size_bytes())?;
        let wq = QuantWeight { w: wb.ptr(), scales: sb.ptr(), biases: bb.ptr(), n, k, bits, group_size: gs as u32, n_experts: e };
        let gather = e > 1;
        super::qmm(dev, dt, &wq, if gather { ib.ptr() } else { 0 }, slots, xb.ptr(), per_slot, yb.ptr())?;
        let out = down(dev, dt, yb.ptr(), slots * n)?;
        let mut want = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let ex = if gather { id as usize } else { 0 };
            let m = QuantizedMatrix::from_parts(
                n,
                k,
                spec,
                words[ex * n * wpr..(ex + 1) * n * wpr].to_vec(),
                scales[ex * groups..(ex + 1) * groups].to_vec(),
                biases[ex * groups..(ex + 1) * groups].to_vec(),
                dt,
            )
            .map_err(|err| crate::CudaError::Invalid(err.to_string()))?;
            let xi = if per_slot { &x[i * k..(i + 1) * k] } else { &x[..] };
            want.extend(m.matmul_t(xi, 1));
        }
        Ok(row("mlxcpu_qmm", format!("{} E={e} N={n} K={k} b{bits} g{gs} slots={slots}{}", tag(dt), if per_slot { " x/slot" } else { "" }), &out, &want))
    }

    fn rms_norm(dev: &CudaDevice, rng: &mut Rng, dt: DType, rows: usize, n: usize) -> Result<TestRow> {
        let x = rng.vec(rows * n, -2.0, 2.0, dt);
        let w = rng.vec(n, 0.5, 1.5, dt);
        let (xb, wb) = (up(dev, dt, &x)?, up(dev, dt, &w)?);
        let yb = poisoned(dev, rows * n * dt.size_bytes())?;
        super::rms_norm(dev, dt, xb.ptr(), wb.ptr(), yb.ptr(), rows, n, 1e-6)?;
        let out = down(dev, dt, yb.ptr(), rows * n)?;
        Ok(row("mlxcpu_rms_norm", format!("{} rows={rows} n={n}", tag(dt)), &out, &cpu::rms_norm(&x, &w, 1e-6, dt)))
    }

    fn attention(dev: &CudaDevice, rng: &mut Rng, dt: DType, s: AttnShape, len: usize) -> Result<TestRow> {
        let (h, kv, d, ml) = (s.n_heads, s.n_kv_heads, s.head_dim, s.max_len);
        let q = rng.vec(h * d, -1.0, 1.0, dt);
        let kc = rng.vec(kv * ml * d, -1.0, 1.0, dt);
        let vc = rng.vec(kv * ml * d, -1.0, 1.0, dt);
        let (qb, kb, vb, lb) = (up(dev, dt, &q)?, up(dev, dt, &kc)?, up(dev, dt, &vc)?, dev.upload(&[len as i32 - 1])?);
        let ws = poisoned(dev, super::attention_workspace_bytes(&s))?;
        let yb = poisoned(dev, h * d * dt.size_bytes())?;
        let scale = (d as f32).powf(-0.5);
        super::attention(dev, dt, &s, qb.ptr(), kb.ptr(), vb.ptr(), lb.ptr(), 1, scale, ws.ptr(), yb.ptr())?;
        let out = down(dev, dt, yb.ptr(), h * d)?;
        let first = |c: &[f32]| -> Vec<f32> { (0..kv).flat_map(|i| c[i * ml * d..(i * ml + len) * d].to_vec()).collect() };
        let want = cpu::sdpa(&q, &first(&kc), &first(&vc), h, kv, 1, d, scale, false, dt);
        Ok(row("mlxcpu_attention", format!("{} H={h} KV={kv} D={d} len={len}", tag(dt)), &out, &want))
    }

    /// Logits from a few levels, so many probabilities tie and argpartition's tie order shows.
    fn softmax_topk(dev: &CudaDevice, rng: &mut Rng, dt: DType, e: usize, k: usize, renorm: bool) -> Result<TestRow> {
        let logits: Vec<f32> = (0..e).map(|_| dt.round((rng.next_u32() % 13) as f32 * 0.25 - 1.5)).collect();
        let lb = up(dev, dt, &logits)?;
        let (ib, wb) = (poisoned(dev, k * 4)?, poisoned(dev, k * 4)?);
        super::softmax_topk(dev, dt, lb.ptr(), e, k, renorm, ib.ptr(), wb.ptr())?;
        let ids: Vec<u32> = dev.read(ib.ptr(), k)?;
        let w: Vec<f32> = dev.read(wb.ptr(), k)?;
        // mlx-lm's Qwen3-MoE router on the CPU (zmlx-models SparseMoeBlock::route).
        let mut p = logits.clone();
        cpu::softmax_precise(&mut p, dt);
        let want_ids = cpu::argpartition(&p, e - k)[e - k..].to_vec();
        let mut want_w: Vec<f32> = want_ids.iter().map(|&i| p[i as usize]).collect();
        if renorm {
            let sum = cpu::sum_in_dtype(want_w.iter().copied(), dt);
            want_w.iter_mut().for_each(|v| *v = dt.round(*v / sum));
        }
        let as_f32 = |v: &[u32]| v.iter().map(|&i| f32::from_bits(i)).collect::<Vec<_>>();
        let (out, want) = ([as_f32(&ids), w].concat(), [as_f32(&want_ids), want_w].concat());
        Ok(row("mlxcpu_softmax_topk", format!("{} E={e} k={k}{}", tag(dt), if renorm { " renorm" } else { "" }), &out, &want))
    }

    fn logprobs_argmax(dev: &CudaDevice, rng: &mut Rng, dt: DType, n: usize) -> Result<TestRow> {
        let l = rng.vec(n, -4.0, 12.0, dt);
        let lb = up(dev, dt, &l)?;
        let ob = poisoned(dev, 4)?;
        super::logprobs_argmax(dev, dt, lb.ptr(), n, ob.ptr())?;
        let got: Vec<u32> = dev.read(ob.ptr(), 1)?;
        let lse = cpu::logsumexp(&l, dt);
        let lp: Vec<f32> = l.iter().map(|&v| dt.round(v - lse)).collect();
        let want = cpu::argmax(&lp) as u32;
        Ok(row("mlxcpu_logprobs_argmax", format!("{} n={n}", tag(dt)), &[f32::from_bits(got[0])], &[f32::from_bits(want)]))
    }

    pub fn run(dev: &CudaDevice, rng: &mut Rng) -> Vec<TestRow> {
        let mut rows = Vec::new();
        let mut push = |name: &str, r: Result<TestRow>| rows.push(TestRow::from_result(name, r));
        let (bf, f16, f32) = (DType::BF16, DType::F16, DType::F32);
        for bits in [2, 3, 4, 5, 6, 8] {
            for gs in [32, 64, 128] {
                push("mlxcpu_qmm", qmm(dev, rng, bf, 1, 70, 256, bits, gs, 1, false));
            }
        }
        push("mlxcpu_qmm", qmm(dev, rng, f16, 1, 300, 640, 4, 64, 1, false));
        push("mlxcpu_qmm", qmm(dev, rng, f32, 1, 300, 640, 3, 32, 1, false));
        push("mlxcpu_qmm", qmm(dev, rng, bf, 8, 96, 512, 4, 64, 3, false));
        push("mlxcpu_qmm", qmm(dev, rng, bf, 8, 64, 96, 6, 32, 2, true));
        push("mlxcpu_qmm", qmm(dev, rng, f16, 16, 48, 256, 8, 128, 4, true));
        for dt in [bf, f16, f32] {
            push("mlxcpu_rms_norm", rms_norm(dev, rng, dt, 4, 2048));
            push("mlxcpu_rms_norm", rms_norm(dev, rng, dt, 32, 128));
            push("mlxcpu_attention", attention(dev, rng, dt, AttnShape { n_heads: 8, n_kv_heads: 2, head_dim: 128, max_len: 700 }, 517));
            push("mlxcpu_softmax_topk", softmax_topk(dev, rng, dt, 128, 8, true));
            push("mlxcpu_logprobs_argmax", logprobs_argmax(dev, rng, dt, 20000));
        }
        push("mlxcpu_attention", attention(dev, rng, bf, AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 32, max_len: 64 }, 1));
        push("mlxcpu_attention", attention(dev, rng, f16, AttnShape { n_heads: 4, n_kv_heads: 1, head_dim: 16, max_len: 300 }, 300));
        push("mlxcpu_softmax_topk", softmax_topk(dev, rng, bf, 8, 2, true));
        push("mlxcpu_softmax_topk", softmax_topk(dev, rng, bf, 16, 4, false));
        push("mlxcpu_softmax_topk", softmax_topk(dev, rng, bf, 512, 10, true));
        push("mlxcpu_logprobs_argmax", logprobs_argmax(dev, rng, bf, 384));
        rows
    }
}
