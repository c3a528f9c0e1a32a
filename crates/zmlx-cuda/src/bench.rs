//! Micro-benchmarks. Each timing: a CUDA graph of B back-to-back launches (inputs rotated
//! over enough copies to defeat the 50 MB L2 where the working set is small), replayed
//! ≥100 times after warm-up, each replay timed with CUDA events; reported is the median
//! per launch. Bandwidth counts the fewest bytes the kernel must move (weights, scales,
//! biases, inputs read once, outputs written once) and is compared with a large
//! device-to-device copy measured in the same run (bytes read + written).

use zmlx_core::DType;

use crate::ops::{self, AttnKernel, AttnShape, QuantWeight};
use crate::reference::Rng;
use crate::runtime::{CudaDevice, DevBuf};
use crate::Result;

#[derive(Clone, Debug)]
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    pub bytes: u64,
    pub median_us: f64,
    pub gbps: f64,
    pub pct_copy: f64,
}

const REPS: usize = 120;
const WARM: usize = 10;
/// Rotate inputs over at least this many bytes so repeated launches miss the L2.
const ROTATE_BYTES: usize = 256 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median µs per launch of `body(dev, i)` for i in 0..batch, captured once as a graph.
/// `sets` routing draws of `k` distinct expert ids out of `e`, concatenated (`[sets, k]`).
fn expert_id_sets(rng: &mut Rng, e: usize, k: usize, sets: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(sets * k);
    for _ in 0..sets {
        let mut set: Vec<u32> = Vec::with_capacity(k);
        while set.len() < k {
            let c = rng.next_u32() % e as u32;
            if !set.contains(&c) {
                set.push(c);
            }
        }
        ids.extend(set);
    }
    ids
}

fn time_graph(dev: &CudaDevice, batch: usize, body: &dyn Fn(&CudaDevice, usize) -> Result<()>) -> Result<f64> {
    let g = dev.capture(|d| {
        for i in 0..batch {
            body(d, i)?;
        }
        Ok(())
    })?;
    let t = dev.timer()?;
    for _ in 0..WARM {
        g.replay()?;
    }
    dev.sync()?;
    let mut samples = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        dev.record_start(&t)?;
        g.replay()?;
        samples.push(dev.record_end_ms(&t)? as f64 * 1000.0 / batch as f64);
    }
    Ok(median(samples))
}

/// Device-to-device copy bandwidth (GB/s, read + write) of a 1 GiB buffer: (cuMemcpyDtoD,
/// a 16-byte-per-thread copy kernel).
pub fn copy_bandwidth(dev: &CudaDevice) -> Result<(f64, f64)> {
    let n = 1usize << 30;
    let a = dev.alloc(n)?;
    let b = dev.alloc(n)?;
    dev.memset(a.ptr(), 0x5a, n)?;
    let us = time_graph(dev, 4, &|d, _| d.copy(b.ptr(), a.ptr(), n))?;
    let memcpy = 2.0 * n as f64 / (us * 1e-6) / 1e9;
    let us = time_graph(dev, 4, &|d, _| ops::copy_kernel(d, a.ptr(), b.ptr(), n))?;
    let kernel = 2.0 * n as f64 / (us * 1e-6) / 1e9;
    Ok((memcpy, kernel))
}

fn random_buf(dev: &CudaDevice, rng: &mut Rng, bytes: usize) -> Result<DevBuf> {
    // Random bits everywhere; for float arrays use `random_floats` (no NaN/Inf).
    let words: Vec<u32> = (0..bytes.div_ceil(4)).map(|_| rng.next_u32()).collect();
    dev.upload(&words)
}
fn random_floats(dev: &CudaDevice, rng: &mut Rng, dt: DType, n: usize, lo: f32, hi: f32) -> Result<DevBuf> {
    dev.upload(&crate::reference::encode(dt, &rng.vec(n, lo, hi, dt)))
}

struct QSet {
    _bufs: Vec<DevBuf>,
    ws: Vec<QuantWeight>,
}
fn qweights(dev: &CudaDevice, rng: &mut Rng, dt: DType, e: usize, n: usize, k: usize, bits: u32, gs: usize) -> Result<QSet> {
    let proto = QuantWeight { w: 0, scales: 0, biases: 0, n, k, bits, group_size: gs as u32, n_experts: e };
    let one = proto.bytes_per_expert(dt) * e;
    let copies = ROTATE_BYTES.div_ceil(one).clamp(1, 64);
    let mut bufs = Vec::new();
    let mut ws = Vec::new();
    let groups = e * n * k / gs;
    for _ in 0..copies {
        let w = random_buf(dev, rng, e * n * k * bits as usize / 8)?;
        let s = random_floats(dev, rng, dt, groups, -0.02, 0.02)?;
        let b = random_floats(dev, rng, dt, groups, -0.1, 0.1)?;
        ws.push(QuantWeight { w: w.ptr(), scales: s.ptr(), biases: b.ptr(), ..proto });
        bufs.extend([w, s, b]);
    }
    Ok(QSet { _bufs: bufs, ws })
}

fn row(kernel: &str, shape: String, bytes: u64, us: f64, copy_gbps: f64) -> BenchRow {
    let gbps = bytes as f64 / (us * 1e-6) / 1e9;
    BenchRow { kernel: kernel.into(), shape, bytes, median_us: us, gbps, pct_copy: 100.0 * gbps / copy_gbps }
}

/// All benchmarks; the first row is the copy bandwidth itself.
pub fn run_benchmarks(dev: &CudaDevice) -> Vec<BenchRow> {
    match run_benchmarks_inner(dev) {
        Ok(r) => r,
        Err(e) => vec![BenchRow { kernel: format!("ERROR: {e}"), shape: String::new(), bytes: 0, median_us: f64::NAN, gbps: f64::NAN, pct_copy: f64::NAN }],
    }
}

fn run_benchmarks_inner(dev: &CudaDevice) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let (memcpy, kcopy) = copy_bandwidth(dev)?;
    // The baseline is the faster of the two copies.
    let copy = memcpy.max(kcopy);
    rows.push(BenchRow { kernel: "memcpy_dtod".into(), shape: "1 GiB, read+write".into(), bytes: 2 << 30, median_us: 2.0 * (1u64 << 30) as f64 / memcpy / 1e3, gbps: memcpy, pct_copy: 100.0 * memcpy / copy });
    rows.push(BenchRow { kernel: "copy_kernel".into(), shape: "1 GiB, read+write, 16 B/thread".into(), bytes: 2 << 30, median_us: 2.0 * (1u64 << 30) as f64 / kcopy / 1e3, gbps: kcopy, pct_copy: 100.0 * kcopy / copy });
    let mut rng = Rng::new(0x5eed);
    let bf = DType::BF16;
    let act = dev.alloc(64 << 20)?; // activations (x, y), small
    let xs = random_floats(dev, &mut rng, bf, 16 * 8192, -1.0, 1.0)?;
    let _ = &act;

    // Dense quantized matmuls (Qwen3-30B-A3B shapes, 4-bit g64 bf16).
    for &(label, n, k, bits, gs) in &[
        ("lm_head", 151936usize, 2048usize, 4u32, 64usize),
        ("lm_head", 151936, 2048, 8, 64),
        ("lm_head", 151936, 2048, 3, 64),
        ("lm_head", 151936, 2048, 6, 64),
        ("q_proj", 4096, 2048, 4, 64),
        ("o_proj", 2048, 4096, 4, 64),
        ("k_proj", 512, 2048, 4, 64),
        ("router", 128, 2048, 8, 64),
    ] {
        let set = qweights(dev, &mut rng, bf, 1, n, k, bits, gs)?;
        let bytes = (set.ws[0].bytes_per_expert(bf) + (k + n) * 2) as u64;
        let nb = set.ws.len();
        let us = time_graph(dev, nb.max(4), &|d, i| ops::qmv(d, bf, &set.ws[i % nb], xs.ptr(), act.ptr()))?;
        rows.push(row("qmv", format!("{label} N={n} K={k} b{bits} g{gs} bf16"), bytes, us, copy));
        if label == "o_proj" {
            let res = act.ptr() + (32 << 20);
            let us = time_graph(dev, nb.max(4), &|d, i| {
                ops::qmv(d, bf, &set.ws[i % nb], xs.ptr(), act.ptr())?;
                ops::add(d, bf, res, act.ptr(), res, n)
            })?;
            rows.push(row("qmv + add", format!("{label} N={n} K={k} b{bits} g{gs} bf16 (2 launches)"), bytes, us, copy));
            let us = time_graph(dev, nb.max(4), &|d, i| ops::qmv_add(d, bf, &set.ws[i % nb], xs.ptr(), res, res))?;
            rows.push(row("qmv_add", format!("{label} N={n} K={k} b{bits} g{gs} bf16"), bytes, us, copy));
        }
    }

    // MoE experts: 8 of 128, gate/up (shared x) and down (x per expert).
    for &(label, n, k, per) in &[("gate/up", 768usize, 2048usize, false), ("down", 2048, 768, true)] {
        let (e, kk) = (128usize, 8usize);
        let set = qweights(dev, &mut rng, bf, e, n, k, 4, 64)?;
        let nsets = 16;
        let idb = dev.upload(&expert_id_sets(&mut rng, e, kk, nsets))?;
        let bytes = (kk * set.ws[0].bytes_per_expert(bf) + (if per { kk * k } else { k } + kk * n) * 2) as u64;
        let nb = set.ws.len();
        let us = time_graph(dev, 16, &|d, i| {
            ops::gather_qmv(d, bf, &set.ws[i % nb], idb.ptr() + ((i % nsets) * kk * 4) as u64, kk, xs.ptr(), per, act.ptr())
        })?;
        rows.push(row("gather_qmv", format!("{label} E={e} k={kk} N={n} K={k} b4 g64 bf16"), bytes, us, copy));
    }

    // Attention decode, Qwen3-30B-A3B: 32 q heads, 4 kv heads, D=128.
    for &len in &[256usize, 4096, 32768] {
        let s = AttnShape { n_heads: 32, n_kv_heads: 4, head_dim: 128, max_len: len };
        let cache_bytes = s.n_kv_heads * len * s.head_dim * 2;
        let copies = (ROTATE_BYTES / (2 * cache_bytes)).clamp(1, 16);
        let caches: Vec<(DevBuf, DevBuf)> = (0..copies)
            .map(|_| Ok((random_floats(dev, &mut rng, bf, cache_bytes / 2, -1.0, 1.0)?, random_floats(dev, &mut rng, bf, cache_bytes / 2, -1.0, 1.0)?)))
            .collect::<Result<_>>()?;
        let lenb = dev.upload(&[len as i32])?;
        let ws = dev.alloc(s.workspace_bytes())?;
        let bytes = (2 * cache_bytes + 2 * 32 * 128 * 2) as u64;
        for kernel in AttnKernel::ALL {
            let us = time_graph(dev, copies.max(4), &|d, i| {
                let (k, v) = &caches[i % copies];
                ops::attention_decode(d, bf, &s, kernel, xs.ptr(), k.ptr(), v.ptr(), lenb.ptr(), 0, 0.088, ws.ptr(), act.ptr())
            })?;
            rows.push(row("attention_decode", format!("{kernel:?} H=32 KV=4 D=128 len={len} bf16"), bytes, us, copy));
        }
    }

    // Small ops (latency-bound).
    let pos = dev.upload(&[1234i32])?;
    let w = random_floats(dev, &mut rng, bf, 8192, 0.5, 1.5)?;
    let us = time_graph(dev, 32, &|d, _| ops::rms_norm(d, bf, xs.ptr(), w.ptr(), act.ptr(), 1, 2048, 1e-6))?;
    rows.push(row("rms_norm", "rows=1 D=2048 bf16".into(), 3 * 2048 * 2, us, copy));
    let us = time_graph(dev, 32, &|d, _| ops::rms_norm(d, bf, xs.ptr(), w.ptr(), act.ptr(), 32, 128, 1e-6))?;
    rows.push(row("rms_norm", "rows=32 D=128 (q_norm) bf16".into(), (2 * 32 * 128 + 128) * 2, us, copy));
    let us = time_graph(dev, 32, &|d, _| ops::rope(d, bf, xs.ptr(), act.ptr(), pos.ptr(), 0, 32, 128, 128, 1e6, 1.0))?;
    rows.push(row("rope", "rows=32 hd=128 bf16".into(), 2 * 32 * 128 * 2, us, copy));
    let us = time_graph(dev, 32, &|d, _| ops::swiglu(d, bf, xs.ptr(), xs.ptr() + 16384, act.ptr(), 8 * 768))?;
    rows.push(row("swiglu", "n=8x768 bf16".into(), 3 * 8 * 768 * 2, us, copy));
    let wts = dev.upload(&[0.125f32; 8])?;
    let us = time_graph(dev, 32, &|d, _| ops::moe_combine(d, bf, xs.ptr(), wts.ptr(), act.ptr(), 8, 2048))?;
    rows.push(row("moe_combine", "k=8 n=2048 bf16".into(), (9 * 2048 * 2 + 32) as u64, us, copy));
    let us = time_graph(dev, 32, &|d, _| ops::add(d, bf, xs.ptr(), xs.ptr() + 8192, act.ptr(), 2048))?;
    rows.push(row("add", "n=2048 bf16".into(), 3 * 2048 * 2, us, copy));
    let ids = dev.alloc(64 * 4)?;
    let wout = dev.alloc(64 * 4)?;
    let us = time_graph(dev, 32, &|d, _| ops::softmax_topk(d, bf, xs.ptr(), 1, 128, 8, true, true, ids.ptr(), wout.ptr()))?;
    rows.push(row("softmax_topk", "E=128 k=8 bf16".into(), 128 * 2 + 64, us, copy));
    // DeepSeek-V3's gating (256 experts, 8 groups keep 4, top-8): logits + f32 bias in, ids + weights out.
    let bias = random_floats(dev, &mut rng, DType::F32, 256, -0.1, 0.1)?;
    let deepseek = zmlx_core::ops::GroupGating { top_k: 8, n_group: 8, topk_group: 4, routed_scaling_factor: 2.5, norm_topk_prob: true };
    let us = time_graph(dev, 32, &|d, _| ops::group_topk(d, bf, xs.ptr(), bias.ptr(), 256, &deepseek, ids.ptr(), wout.ptr()))?;
    rows.push(row("group_topk", "E=256 k=8 groups 4/8 bf16".into(), 256 * 6 + 64, us, copy));
    let logits = random_floats(dev, &mut rng, bf, 151936, -10.0, 10.0)?;
    let amws = dev.alloc(ops::ARGMAX_WORKSPACE_BYTES)?;
    dev.memset(amws.ptr(), 0, ops::ARGMAX_WORKSPACE_BYTES)?;
    let us = time_graph(dev, 32, &|d, _| ops::argmax(d, bf, logits.ptr(), 151936, amws.ptr(), ids.ptr()))?;
    rows.push(row("argmax", "n=151936 bf16".into(), 151936 * 2 + 4, us, copy));
    let emb = qweights(dev, &mut rng, bf, 1, 151936, 2048, 4, 64)?;
    let tok = dev.upload(&[4242u32])?;
    let us = time_graph(dev, 32, &|d, _| ops::embed(d, bf, &emb.ws[0], tok.ptr(), act.ptr()))?;
    rows.push(row("embed", "D=2048 b4 g64 bf16".into(), (2048 / 2 + 2 * 32 * 2 + 2048 * 2) as u64, us, copy));
    let kc = dev.alloc(4 * 4096 * 128 * 2)?;
    let vc = dev.alloc(4 * 4096 * 128 * 2)?;
    let s = AttnShape { n_heads: 32, n_kv_heads: 4, head_dim: 128, max_len: 4096 };
    let us = time_graph(dev, 32, &|d, _| ops::kv_append(d, bf, &s, xs.ptr(), xs.ptr() + 4096, kc.ptr(), vc.ptr(), pos.ptr(), 0))?;
    rows.push(row("kv_append", "KV=4 D=128 bf16".into(), 4 * 4 * 128 * 2, us, copy));
    rows.extend(fused_benches(dev, &mut rng, copy)?);
    rows.extend(latency_benches(dev, &mut rng, copy)?);
    Ok(rows)
}

pub fn format_bench(rows: &[BenchRow]) -> String {
    let mut s = format!("{:<18} {:<44} {:>12} {:>10} {:>9} {:>7}\n", "kernel", "shape", "bytes", "median_us", "GB/s", "%copy");
    for r in rows {
        s += &format!("{:<18} {:<44} {:>12} {:>10.2} {:>9.1} {:>6.1}%\n", r.kernel, r.shape, r.bytes, r.median_us, r.gbps, r.pct_copy);
    }
    s
}

/// Fused MoE kernels (crate::fused) vs the unfused chains they replace, Qwen3-30B-A3B
/// shapes (hidden 2048, 128 experts, top-8, FFN 768, experts 4-bit g64, router 8-bit g64, bf16).
fn fused_benches(dev: &CudaDevice, rng: &mut Rng, copy: f64) -> Result<Vec<BenchRow>> {
    use crate::fused;
    let mut rows = Vec::new();
    let bf = DType::BF16;
    let (e, kk, d, f) = (128usize, 8usize, 2048usize, 768usize);
    let gate = qweights(dev, rng, bf, e, f, d, 4, 64)?;
    let upw = qweights(dev, rng, bf, e, f, d, 4, 64)?;
    let downw = qweights(dev, rng, bf, e, d, f, 4, 64)?;
    let router = qweights(dev, rng, bf, 1, e, d, 8, 64)?;
    let nsets = 16;
    let idb = dev.upload(&expert_id_sets(rng, e, kk, nsets))?;
    let idp = |i: usize| idb.ptr() + ((i % nsets) * kk * 4) as u64;
    let wts = dev.upload(&[0.2f32, 0.18, 0.15, 0.12, 0.11, 0.1, 0.08, 0.06])?;
    let x = random_floats(dev, rng, bf, d, -1.0, 1.0)?;
    let h = random_floats(dev, rng, bf, d, -1.0, 1.0)?;
    let delta = random_floats(dev, rng, bf, d, -1.0, 1.0)?;
    let nw = random_floats(dev, rng, bf, d, 0.5, 1.5)?;
    let actk = random_floats(dev, rng, bf, kk * f, -1.0, 1.0)?;
    let sz = 2usize;
    let (g, u, act, y, ff, xn, logits) = (dev.alloc(kk * f * sz)?, dev.alloc(kk * f * sz)?, dev.alloc(kk * f * sz)?, dev.alloc(kk * d * sz)?, dev.alloc(d * sz)?, dev.alloc(d * sz)?, dev.alloc(e * sz)?);
    let (gid, gwt) = (dev.alloc(64 * 4)?, dev.alloc(64 * 4)?);
    let gws = dev.alloc(fused::moe_gating_workspace_bytes(e))?;
    dev.memset(gws.ptr(), 0, fused::moe_gating_workspace_bytes(e))?;
    let (ng, nu, nd, nr) = (gate.ws.len(), upw.ws.len(), downw.ws.len(), router.ws.len());
    let pe_up = gate.ws[0].bytes_per_expert(bf);
    let pe_down = downw.ws[0].bytes_per_expert(bf);
    let pe_router = router.ws[0].bytes_per_expert(bf);

    // gate + up + swiglu
    let bytes = (2 * kk * pe_up + d * sz + kk * f * sz) as u64;
    let us = time_graph(dev, 16, &|dv, i| {
        ops::gather_qmv(dv, bf, &gate.ws[i % ng], idp(i), kk, x.ptr(), false, g.ptr())?;
        ops::gather_qmv(dv, bf, &upw.ws[i % nu], idp(i), kk, x.ptr(), false, u.ptr())?;
        ops::swiglu(dv, bf, g.ptr(), u.ptr(), act.ptr(), kk * f)
    })?;
    rows.push(row("unfused gate/up/swiglu", "gather+gather+swiglu (3 launches)".into(), bytes, us, copy));
    for (r, t) in [(1u32, 128u32), (1, 64), (1, 256), (2, 128), (2, 64)] {
        let us = time_graph(dev, 16, &|dv, i| fused::gather_qmm_swiglu_rows(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], idp(i), kk, x.ptr(), act.ptr(), r, t))?;
        rows.push(row("gather_qmm_swiglu", format!("E=128 k=8 N=768 K=2048 b4 g64 r{r} t{t}"), bytes, us, copy));
    }
    // down + combine + residual add
    let bytes = (kk * pe_down + kk * f * sz + 2 * d * sz) as u64;
    let us = time_graph(dev, 16, &|dv, i| {
        ops::gather_qmv(dv, bf, &downw.ws[i % nd], idp(i), kk, actk.ptr(), true, y.ptr())?;
        ops::moe_combine(dv, bf, y.ptr(), wts.ptr(), ff.ptr(), kk, d)?;
        ops::add(dv, bf, h.ptr(), ff.ptr(), xn.ptr(), d)
    })?;
    rows.push(row("unfused down/comb/add", "gather+moe_combine+add (3 launches)".into(), bytes, us, copy));
    for r in [1u32, 2, 4] {
        let us = time_graph(dev, 16, &|dv, i| fused::gather_qmm_combine_rows(dv, bf, &downw.ws[i % nd], idp(i), wts.ptr(), kk, actk.ptr(), h.ptr(), xn.ptr(), r))?;
        rows.push(row("gather_qmm_combine", format!("E=128 k=8 N=2048 K=768 b4 g64 +res r{r}"), bytes, us, copy));
    }
    // the experts: gather_qmm_swiglu + gather_qmm_combine vs moe_experts (one launch)
    let bytes = (2 * kk * pe_up + kk * pe_down + 3 * d * sz + 2 * kk * f * sz) as u64;
    let bar = dev.alloc(fused::MOE_EXPERTS_WORKSPACE_BYTES)?;
    dev.memset(bar.ptr(), 0, fused::MOE_EXPERTS_WORKSPACE_BYTES)?;
    let us = time_graph(dev, 16, &|dv, i| {
        fused::gather_qmm_swiglu(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], idp(i), kk, x.ptr(), act.ptr())?;
        fused::gather_qmm_combine(dv, bf, &downw.ws[i % nd], idp(i), wts.ptr(), kk, act.ptr(), h.ptr(), xn.ptr())
    })?;
    rows.push(row("swiglu+combine", "E=128 k=8 F=768 D=2048 b4 g64 (2 launches)".into(), bytes, us, copy));
    match fused::moe_experts_unsupported(dev, bf, &gate.ws[0], &upw.ws[0], &downw.ws[0], kk) {
        None => {
            let us = time_graph(dev, 16, &|dv, i| {
                fused::moe_experts(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], &downw.ws[i % nd], idp(i), wts.ptr(), kk, x.ptr(), act.ptr(), h.ptr(), xn.ptr(), bar.ptr())
            })?;
            let (_, blocks, threads, smem) = fused::moe_experts_grid(dev, bf, &downw.ws[0], kk)?;
            rows.push(row("moe_experts", format!("E=128 k=8 F=768 D=2048 b4 g64 (1 launch: {blocks}x{threads}, {smem} B smem)"), bytes, us, copy));
            for (stop, what) in [(5, "gate/up phase only, no down staging"), (1, "gate/up phase only"), (2, "up to the grid barrier"), (3, "+ act and down tile in smem"), (4, "+ tc4 partials")] {
                let us = time_graph(dev, 16, &|dv, i| {
                    fused::moe_experts_partial(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], &downw.ws[i % nd], idp(i), wts.ptr(), kk, x.ptr(), act.ptr(), h.ptr(), xn.ptr(), bar.ptr(), stop)
                })?;
                rows.push(row("moe_experts", format!("E=128 k=8 F=768 D=2048 b4 g64 ({what})"), bytes, us, copy));
            }
        }
        Some(why) => eprintln!("moe_experts not measured: {why}"),
    }
    // norm + router + top-k
    let bytes = (pe_router + 3 * d * sz + kk * 8) as u64;
    let us = time_graph(dev, 32, &|dv, i| {
        ops::rms_norm(dv, bf, h.ptr(), nw.ptr(), xn.ptr(), 1, d, 1e-6)?;
        ops::qmv(dv, bf, &router.ws[i % nr], xn.ptr(), logits.ptr())?;
        ops::softmax_topk(dv, bf, logits.ptr(), 1, e, kk, true, true, gid.ptr(), gwt.ptr())
    })?;
    rows.push(row("unfused router", "rms_norm+qmv+softmax_topk (3 launches)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, i| fused::moe_gating(dv, bf, &router.ws[i % nr], h.ptr(), nw.ptr(), 1e-6, xn.ptr(), kk, true, true, gid.ptr(), gwt.ptr(), gws.ptr()))?;
    rows.push(row("moe_gating", "rms_norm + E=128 k=8 K=2048 b8 g64 (cluster where it fits)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, i| fused::moe_gating_with(dv, bf, &router.ws[i % nr], h.ptr(), nw.ptr(), 1e-6, xn.ptr(), kk, true, true, gid.ptr(), gwt.ptr(), gws.ptr(), false))?;
    rows.push(row("moe_gating", "rms_norm + E=128 k=8 K=2048 b8 g64 (last-block handoff)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, i| {
        ops::qmv(dv, bf, &router.ws[i % nr], xn.ptr(), logits.ptr())?;
        ops::softmax_topk(dv, bf, logits.ptr(), 1, e, kk, true, true, gid.ptr(), gwt.ptr())
    })?;
    rows.push(row("unfused router", "qmv+softmax_topk (2 launches)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, i| fused::moe_gating(dv, bf, &router.ws[i % nr], xn.ptr(), 0, 1e-6, 0, kk, true, true, gid.ptr(), gwt.ptr(), gws.ptr()))?;
    rows.push(row("moe_gating", "no norm, E=128 k=8 K=2048 b8 g64 (cluster where it fits)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, i| {
        fused::norm_router(dv, bf, &router.ws[i % nr], h.ptr(), nw.ptr(), 1e-6, xn.ptr(), logits.ptr())?;
        ops::softmax_topk(dv, bf, logits.ptr(), 1, e, kk, true, true, gid.ptr(), gwt.ptr())
    })?;
    rows.push(row("norm_router+topk", "E=128 k=8 K=2048 b8 g64 (2 launches)".into(), bytes, us, copy));
    // add + rms_norm
    let bytes = (5 * d * sz) as u64;
    let us = time_graph(dev, 32, &|dv, _| {
        ops::add(dv, bf, h.ptr(), delta.ptr(), ff.ptr(), d)?;
        ops::rms_norm(dv, bf, ff.ptr(), nw.ptr(), xn.ptr(), 1, d, 1e-6)
    })?;
    rows.push(row("unfused add+rms_norm", "D=2048 (2 launches)".into(), bytes, us, copy));
    let us = time_graph(dev, 32, &|dv, _| fused::add_rms_norm(dv, bf, h.ptr(), delta.ptr(), nw.ptr(), ff.ptr(), xn.ptr(), d, 1e-6))?;
    rows.push(row("add_rms_norm", "D=2048".into(), bytes, us, copy));

    // One layer's MoE block, post-attention: add, rms_norm, router, top-k, experts, combine, add.
    let hs = dev.alloc(d * sz)?;
    dev.copy(hs.ptr(), h.ptr(), d * sz)?;
    let bytes = (pe_router + 3 * kk * pe_up.max(pe_down) + 8 * d * sz) as u64;
    let us = time_graph(dev, 16, &|dv, i| {
        ops::add(dv, bf, hs.ptr(), delta.ptr(), hs.ptr(), d)?;
        ops::rms_norm(dv, bf, hs.ptr(), nw.ptr(), xn.ptr(), 1, d, 1e-6)?;
        ops::qmv(dv, bf, &router.ws[i % nr], xn.ptr(), logits.ptr())?;
        ops::softmax_topk(dv, bf, logits.ptr(), 1, e, kk, true, true, gid.ptr(), gwt.ptr())?;
        ops::gather_qmv(dv, bf, &gate.ws[i % ng], gid.ptr(), kk, xn.ptr(), false, g.ptr())?;
        ops::gather_qmv(dv, bf, &upw.ws[i % nu], gid.ptr(), kk, xn.ptr(), false, u.ptr())?;
        ops::swiglu(dv, bf, g.ptr(), u.ptr(), act.ptr(), kk * f)?;
        ops::gather_qmv(dv, bf, &downw.ws[i % nd], gid.ptr(), kk, act.ptr(), true, y.ptr())?;
        ops::moe_combine(dv, bf, y.ptr(), gwt.ptr(), ff.ptr(), kk, d)?;
        ops::add(dv, bf, hs.ptr(), ff.ptr(), hs.ptr(), d)
    })?;
    rows.push(row("MoE block unfused", "add,norm,router,topk,gate,up,swiglu,down,comb,add".into(), bytes, us, copy));
    let us = time_graph(dev, 16, &|dv, i| {
        ops::add(dv, bf, hs.ptr(), delta.ptr(), hs.ptr(), d)?;
        fused::moe_gating(dv, bf, &router.ws[i % nr], hs.ptr(), nw.ptr(), 1e-6, xn.ptr(), kk, true, true, gid.ptr(), gwt.ptr(), gws.ptr())?;
        fused::gather_qmm_swiglu(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], gid.ptr(), kk, xn.ptr(), act.ptr())?;
        fused::gather_qmm_combine(dv, bf, &downw.ws[i % nd], gid.ptr(), gwt.ptr(), kk, act.ptr(), hs.ptr(), hs.ptr())
    })?;
    rows.push(row("MoE block fused", "add,moe_gating(+norm),swiglu,combine (4)".into(), bytes, us, copy));
    let us = time_graph(dev, 16, &|dv, i| {
        ops::add(dv, bf, hs.ptr(), delta.ptr(), hs.ptr(), d)?;
        ops::rms_norm(dv, bf, hs.ptr(), nw.ptr(), xn.ptr(), 1, d, 1e-6)?;
        ops::qmv(dv, bf, &router.ws[i % nr], xn.ptr(), logits.ptr())?;
        ops::softmax_topk(dv, bf, logits.ptr(), 1, e, kk, true, true, gid.ptr(), gwt.ptr())?;
        fused::gather_qmm_swiglu(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], gid.ptr(), kk, xn.ptr(), act.ptr())?;
        fused::gather_qmm_combine(dv, bf, &downw.ws[i % nd], gid.ptr(), gwt.ptr(), kk, act.ptr(), hs.ptr(), hs.ptr())
    })?;
    rows.push(row("MoE block fused-x", "add,norm,qmv,topk + swiglu,combine (6)".into(), bytes, us, copy));
    let us = time_graph(dev, 16, &|dv, i| {
        ops::add(dv, bf, hs.ptr(), delta.ptr(), hs.ptr(), d)?;
        ops::rms_norm(dv, bf, hs.ptr(), nw.ptr(), xn.ptr(), 1, d, 1e-6)?;
        ops::qmv(dv, bf, &router.ws[i % nr], xn.ptr(), logits.ptr())?;
        let routing = fused::Routing { logits: logits.ptr(), n_experts: e, renorm: true };
        fused::gather_qmm_swiglu_routed(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], routing, kk, xn.ptr(), act.ptr())?;
        fused::gather_qmm_combine_routed(dv, bf, &downw.ws[i % nd], routing, gid.ptr(), gwt.ptr(), kk, act.ptr(), hs.ptr(), hs.ptr())
    })?;
    rows.push(row("MoE block routed", "add,norm,qmv + swiglu,combine routing themselves (5)".into(), bytes, us, copy));
    // The experts with the top-k: softmax_topk + the two kernels vs the two routing themselves
    // (16 logit sets, so the experts differ from call to call as with the id sets above).
    let lsets = random_floats(dev, rng, bf, nsets * e, -4.0, 4.0)?;
    let lp = |i: usize| lsets.ptr() + ((i % nsets) * e * sz) as u64;
    let bytes = (2 * kk * pe_up + kk * pe_down + 3 * d * sz + 2 * kk * f * sz) as u64;
    let us = time_graph(dev, 16, &|dv, i| {
        ops::softmax_topk(dv, bf, lp(i), 1, e, kk, true, true, gid.ptr(), gwt.ptr())?;
        fused::gather_qmm_swiglu(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], gid.ptr(), kk, x.ptr(), act.ptr())?;
        fused::gather_qmm_combine(dv, bf, &downw.ws[i % nd], gid.ptr(), gwt.ptr(), kk, act.ptr(), h.ptr(), xn.ptr())
    })?;
    rows.push(row("topk+swiglu+combine", "E=128 k=8 F=768 D=2048 b4 g64 (3 launches)".into(), bytes, us, copy));
    let us = time_graph(dev, 16, &|dv, i| {
        let routing = fused::Routing { logits: lp(i), n_experts: e, renorm: true };
        fused::gather_qmm_swiglu_routed(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], routing, kk, x.ptr(), act.ptr())?;
        fused::gather_qmm_combine_routed(dv, bf, &downw.ws[i % nd], routing, gid.ptr(), gwt.ptr(), kk, act.ptr(), h.ptr(), xn.ptr())
    })?;
    rows.push(row("moe_topk_experts", "E=128 k=8 F=768 D=2048 b4 g64 (2 launches)".into(), bytes, us, copy));
    // each kernel alone, routed vs reading ids / weights (what the routing costs each)
    let bytes = (2 * kk * pe_up + d * sz + kk * f * sz) as u64;
    for (r, t) in [(1u32, 128u32), (1, 256), (2, 128)] {
        for routed in [false, true] {
            let us = time_graph(dev, 16, &|dv, i| {
                let routing = routed.then_some(fused::Routing { logits: lp(i), n_experts: e, renorm: true });
                fused::swiglu_launch(dv, bf, &gate.ws[i % ng], &upw.ws[i % nu], idp(i), routing, kk, x.ptr(), act.ptr(), r, t)
            })?;
            rows.push(row(if routed { "swiglu routed" } else { "swiglu" }, format!("E=128 k=8 N=768 K=2048 b4 g64 r{r} t{t}"), bytes, us, copy));
        }
    }
    let bytes = (kk * pe_down + kk * f * sz + 2 * d * sz) as u64;
    for routed in [false, true] {
        let us = time_graph(dev, 16, &|dv, i| {
            let routing = routed.then_some(fused::Routing { logits: lp(i), n_experts: e, renorm: true });
            fused::combine_launch(dv, bf, &downw.ws[i % nd], if routed { gid.ptr() } else { idp(i) }, gwt.ptr(), routing, kk, actk.ptr(), h.ptr(), xn.ptr(), 4)
        })?;
        rows.push(row(if routed { "combine routed" } else { "combine" }, "E=128 k=8 N=2048 K=768 b4 g64 +res".into(), bytes, us, copy));
    }
    Ok(rows)
}

/// Decode-latency kernels before/after (Qwen3-30B-A3B shapes, bf16): attention at several
/// lengths with max_len 40960, qk_norm_rope_append vs its 5-launch chain, qkv vs 3 qmv,
/// softmax_topk fast vs legacy, and one whole decode layer (attention + MoE block) before/after.
pub fn run_latency_benchmarks(dev: &CudaDevice) -> Vec<BenchRow> {
    let r = (|| -> Result<Vec<BenchRow>> {
        let (memcpy, kcopy) = copy_bandwidth(dev)?;
        latency_benches(dev, &mut Rng::new(0x1a7), memcpy.max(kcopy))
    })();
    match r {
        Ok(r) => r,
        Err(e) => vec![BenchRow { kernel: format!("ERROR: {e}"), shape: String::new(), bytes: 0, median_us: f64::NAN, gbps: f64::NAN, pct_copy: f64::NAN }],
    }
}

fn latency_benches(dev: &CudaDevice, rng: &mut Rng, copy: f64) -> Result<Vec<BenchRow>> {
    use crate::fused;
    let mut rows = Vec::new();
    let bf = DType::BF16;
    let (hq, hkv, hd, d) = (32usize, 4usize, 128usize, 2048usize);
    let xs = random_floats(dev, rng, bf, 16 * 8192, -1.0, 1.0)?;
    let act = dev.alloc(16 << 20)?;
    // Attention: caches of max_len 40960 (2 copies, 84 MB each), lengths 1..32768.
    let ml = 40960usize;
    let s = AttnShape { n_heads: hq, n_kv_heads: hkv, head_dim: hd, max_len: ml };
    let cache = hkv * ml * hd;
    let caches: Vec<(DevBuf, DevBuf)> = (0..2)
        .map(|i| {
            let (k, v) = (dev.alloc(cache * 2)?, dev.alloc(cache * 2)?);
            ops::fill_random_uniform(dev, bf, k.ptr(), cache, 11 + i, -1.0, 1.0)?;
            ops::fill_random_uniform(dev, bf, v.ptr(), cache, 21 + i, -1.0, 1.0)?;
            Ok((k, v))
        })
        .collect::<Result<_>>()?;
    let ws = dev.alloc(s.workspace_bytes())?;
    let lenb = dev.alloc(4)?;
    for &len in &[1usize, 128, 256, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768] {
        dev.write(lenb.ptr(), &[len as i32])?;
        let bytes = (2 * hkv * len * hd * 2 + 2 * hq * hd * 2) as u64;
        // Single, the split the engine picks (and half / double it), Long.
        let s0 = (len.div_ceil(ops::ATT_SPLIT_ROWS).next_power_of_two() as u32).clamp(2, ops::ATT_SPLIT_KERNEL_MAX as u32);
        let mut kernels = vec![AttnKernel::Single, AttnKernel::Split(s0), AttnKernel::Long];
        if s0 > 2 {
            kernels.push(AttnKernel::Split(s0 / 2));
        }
        if s0 < ops::ATT_SPLIT_KERNEL_MAX as u32 {
            kernels.push(AttnKernel::Split(s0 * 2));
        }
        for kernel in kernels {
            let us = time_graph(dev, 8, &|dv, i| {
                let (k, v) = &caches[i % 2];
                ops::attention_decode(dv, bf, &s, kernel, xs.ptr(), k.ptr(), v.ptr(), lenb.ptr(), 0, 0.088, ws.ptr(), act.ptr())
            })?;
            rows.push(row("attn_decode", format!("{kernel:?} H=32 KV=4 D=128 len={len} max_len={ml}"), bytes, us, copy));
        }
    }
    // max_len = len = 256 (the earlier table's row)
    {
        let s2 = AttnShape { max_len: 256, ..s };
        dev.write(lenb.ptr(), &[256i32])?;
        let us = time_graph(dev, 8, &|dv, i| {
            let (k, v) = &caches[i % 2];
            ops::attention_decode(dv, bf, &s2, AttnKernel::Single, xs.ptr(), k.ptr(), v.ptr(), lenb.ptr(), 0, 0.088, ws.ptr(), act.ptr())
        })?;
        rows.push(row("attn_decode", "H=32 KV=4 D=128 len=256 max_len=256".into(), (2 * hkv * 256 * hd * 2) as u64, us, copy));
    }
    // q/k norm + rope + append
    let pos = dev.upload(&[1234i32])?;
    let nw = random_floats(dev, rng, bf, 256, 0.5, 1.5)?;
    let (qb, kb) = (dev.alloc(hq * hd * 2)?, dev.alloc(hkv * hd * 2)?);
    let (kc, vc) = (&caches[0].0, &caches[0].1);
    let us = time_graph(dev, 16, &|dv, _| {
        ops::rms_norm(dv, bf, qb.ptr(), nw.ptr(), qb.ptr(), hq, hd, 1e-6)?;
        ops::rms_norm(dv, bf, kb.ptr(), nw.ptr(), kb.ptr(), hkv, hd, 1e-6)?;
        ops::rope(dv, bf, qb.ptr(), qb.ptr(), pos.ptr(), 0, hq, hd, hd, 1e6, 1.0)?;
        ops::rope(dv, bf, kb.ptr(), kb.ptr(), pos.ptr(), 0, hkv, hd, hd, 1e6, 1.0)?;
        ops::kv_append(dv, bf, &s, kb.ptr(), xs.ptr(), kc.ptr(), vc.ptr(), pos.ptr(), 0)
    })?;
    rows.push(row("qk chain (5 launches)", "rms_norm q,k + rope q,k + kv_append".into(), 0, us, copy));
    let us = time_graph(dev, 16, &|dv, _| ops::qk_norm_rope_append(dv, bf, qb.ptr(), kb.ptr(), xs.ptr(), nw.ptr(), nw.ptr(), kc.ptr(), vc.ptr(), pos.ptr(), &s, 1e-6, 1e6))?;
    rows.push(row("qk_norm_rope_append", "Hq=32 Hkv=4 hd=128 bf16".into(), 0, us, copy));
    // The fused attention (qk_norm_rope as its prologue, the patched engine's choice up to
    // 1024 positions) against qk_norm_rope_append + attention; the new token at len - 1.
    let pro = ops::QkNormRope { k: kb.ptr(), v: xs.ptr(), q_norm_w: nw.ptr(), k_norm_w: nw.ptr(), eps: 1e-6, rope_base: 1e6 };
    let posb = dev.alloc(4)?;
    for &len in &[128usize, 384, 512, 1024] {
        let kernel = AttnKernel::for_len(len);
        dev.write(lenb.ptr(), &[len as i32])?;
        dev.write(posb.ptr(), &[len as i32 - 1])?;
        let us = time_graph(dev, 8, &|dv, _| {
            ops::qk_norm_rope_append(dv, bf, qb.ptr(), kb.ptr(), xs.ptr(), nw.ptr(), nw.ptr(), kc.ptr(), vc.ptr(), posb.ptr(), &s, 1e-6, 1e6)?;
            ops::attention_decode(dv, bf, &s, kernel, qb.ptr(), kc.ptr(), vc.ptr(), lenb.ptr(), 0, 0.088, ws.ptr(), act.ptr())
        })?;
        rows.push(row("qk_norm_rope_append + attention", format!("{kernel:?} len={len}"), 0, us, copy));
        let us = time_graph(dev, 8, &|dv, _| {
            ops::attention_decode_qk_norm_rope(dv, bf, &s, kernel, qb.ptr(), kc.ptr(), vc.ptr(), lenb.ptr(), 0, 0.088, ws.ptr(), act.ptr(), &pro)
        })?;
        rows.push(row("attention with qk prologue", format!("{kernel:?} len={len}"), 0, us, copy));
    }
    // q, k, v projections
    let wq = qweights(dev, rng, bf, 1, hq * hd, d, 4, 64)?;
    let wk = qweights(dev, rng, bf, 1, hkv * hd, d, 4, 64)?;
    let wv = qweights(dev, rng, bf, 1, hkv * hd, d, 4, 64)?;
    let wo = qweights(dev, rng, bf, 1, d, hq * hd, 4, 64)?;
    let qkv_bytes = (wq.ws[0].bytes_per_expert(bf) + 2 * wk.ws[0].bytes_per_expert(bf) + d * 2 + (hq + 2 * hkv) * hd * 2) as u64;
    let nb = wk.ws.len().min(wq.ws.len());
    let (yq, yk, yv) = (dev.alloc(hq * hd * 2)?, dev.alloc(hkv * hd * 2)?, dev.alloc(hkv * hd * 2)?);
    let us = time_graph(dev, 16, &|dv, i| {
        ops::qmv(dv, bf, &wq.ws[i % nb], xs.ptr(), yq.ptr())?;
        ops::qmv(dv, bf, &wk.ws[i % nb], xs.ptr(), yk.ptr())?;
        ops::qmv(dv, bf, &wv.ws[i % nb], xs.ptr(), yv.ptr())
    })?;
    rows.push(row("qmv x3 (q,k,v)", "N=4096/512/512 K=2048 b4 g64".into(), qkv_bytes, us, copy));
    let us = time_graph(dev, 16, &|dv, i| fused::qkv(dv, bf, &wq.ws[i % nb], &wk.ws[i % nb], &wv.ws[i % nb], xs.ptr(), yq.ptr(), yk.ptr(), yv.ptr()))?;
    rows.push(row("qkv (qmv_multi)", "N=4096/512/512 K=2048 b4 g64".into(), qkv_bytes, us, copy));
    // softmax_topk
    let (ids, wts) = (dev.alloc(64 * 4)?, dev.alloc(64 * 4)?);
    let us = time_graph(dev, 32, &|dv, _| ops::softmax_topk_legacy(dv, bf, xs.ptr(), 1, 128, 8, true, true, ids.ptr(), wts.ptr()))?;
    rows.push(row("softmax_topk legacy", "E=128 k=8 bf16".into(), 320, us, copy));
    let us = time_graph(dev, 32, &|dv, _| ops::softmax_topk(dv, bf, xs.ptr(), 1, 128, 8, true, true, ids.ptr(), wts.ptr()))?;
    rows.push(row("softmax_topk new", "E=128 k=8 bf16".into(), 320, us, copy));
    // One decode layer, Qwen3-30B-A3B (no feedback between iterations: x fixed).
    let (e, kk, f) = (128usize, 8usize, 768usize);
    let gate = qweights(dev, rng, bf, e, f, d, 4, 64)?;
    let upw = qweights(dev, rng, bf, e, f, d, 4, 64)?;
    let down = qweights(dev, rng, bf, e, d, f, 4, 64)?;
    let router = qweights(dev, rng, bf, 1, e, d, 8, 64)?;
    let nr = router.ws.len();
    let xin = random_floats(dev, rng, bf, d, -1.0, 1.0)?;
    let bufs: Vec<DevBuf> = (0..8).map(|_| dev.alloc(64 << 10)).collect::<Result<_>>()?;
    let (o, h, hn, logits, actb, hout) = (bufs[0].ptr(), bufs[1].ptr(), bufs[2].ptr(), bufs[3].ptr(), bufs[4].ptr(), bufs[5].ptr());
    let attn = bufs[6].ptr();
    let (gw, uw, dw) = (gate.ws[0], upw.ws[0], down.ws[0]);
    for &len in &[256usize, 4096] {
        dev.write(pos.ptr(), &[len as i32 - 1])?;
        for before in [true, false] {
            let us = time_graph(dev, 16, &|dv, i| {
                let (k, v) = &caches[i % 2];
                let j = i % nb;
                if before {
                    ops::qmv(dv, bf, &wq.ws[j], xin.ptr(), yq.ptr())?;
                    ops::qmv(dv, bf, &wk.ws[j], xin.ptr(), yk.ptr())?;
                    ops::qmv(dv, bf, &wv.ws[j], xin.ptr(), yv.ptr())?;
                    ops::rms_norm(dv, bf, yq.ptr(), nw.ptr(), yq.ptr(), hq, hd, 1e-6)?;
                    ops::rms_norm(dv, bf, yk.ptr(), nw.ptr(), yk.ptr(), hkv, hd, 1e-6)?;
                    ops::rope(dv, bf, yq.ptr(), yq.ptr(), pos.ptr(), 0, hq, hd, hd, 1e6, 1.0)?;
                    ops::rope(dv, bf, yk.ptr(), yk.ptr(), pos.ptr(), 0, hkv, hd, hd, 1e6, 1.0)?;
                    ops::kv_append(dv, bf, &s, yk.ptr(), yv.ptr(), k.ptr(), v.ptr(), pos.ptr(), 0)?;
                    ops::attention_decode(dv, bf, &s, AttnKernel::for_len(len), yq.ptr(), k.ptr(), v.ptr(), pos.ptr(), 1, 0.088, ws.ptr(), attn)?;
                } else {
                    fused::qkv(dv, bf, &wq.ws[j], &wk.ws[j], &wv.ws[j], xin.ptr(), yq.ptr(), yk.ptr(), yv.ptr())?;
                    ops::qk_norm_rope_append(dv, bf, yq.ptr(), yk.ptr(), yv.ptr(), nw.ptr(), nw.ptr(), k.ptr(), v.ptr(), pos.ptr(), &s, 1e-6, 1e6)?;
                    ops::attention_decode(dv, bf, &s, AttnKernel::for_len(len), yq.ptr(), k.ptr(), v.ptr(), pos.ptr(), 1, 0.088, ws.ptr(), attn)?;
                }
                ops::qmv(dv, bf, &wo.ws[i % wo.ws.len()], attn, o)?;
                ops::add(dv, bf, xin.ptr(), o, h, d)?;
                ops::rms_norm(dv, bf, h, nw.ptr(), hn, 1, d, 1e-6)?;
                ops::qmv(dv, bf, &router.ws[i % nr], hn, logits)?;
                if before {
                    ops::softmax_topk_legacy(dv, bf, logits, 1, e, kk, true, true, ids.ptr(), wts.ptr())?;
                } else {
                    ops::softmax_topk(dv, bf, logits, 1, e, kk, true, true, ids.ptr(), wts.ptr())?;
                }
                fused::gather_qmm_swiglu(dv, bf, &gw, &uw, ids.ptr(), kk, hn, actb)?;
                fused::gather_qmm_combine(dv, bf, &dw, ids.ptr(), wts.ptr(), kk, actb, h, hout)?;
                ops::rms_norm(dv, bf, hout, nw.ptr(), bufs[7].ptr(), 1, d, 1e-6)
            })?;
            rows.push(row(
                if before { "decode layer before" } else { "decode layer after" },
                format!("Qwen3-30B len={len} max_len={ml} ({} launches)", if before { 19 } else { 13 }),
                0,
                us,
                copy,
            ));
        }
    }
    Ok(rows)
}
