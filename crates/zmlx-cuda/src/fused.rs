//! Launchers for the fused decode kernels (kernels/fused.cu) behind the `patch` patterns.
//! Each one is bitwise identical to the unfused launch sequence it replaces (the self-tests
//! compare them on the device, bit for bit); contracts in docs/kernels.md, "Fused MoE kernels".

use zmlx_core::DType;

use crate::catalog::{dtype_tag, QMV_BITS, QMV_GROUPS};
use crate::ops::{aligned, inv, rms_norm_inv_n, rms_norm_threads, tc4_slices, tc4_threads, uses_tc4, QuantWeight};
use crate::runtime::{Arg, CudaDevice};
use crate::Result;


fn check_q(wq: &QuantWeight, what: &str) -> Result<()> {
    if !QMV_BITS.contains(&wq.bits) || !QMV_GROUPS.contains(&wq.group_size) {
        return Err(inv(format!("{what}: unsupported quantization bits={} group={}", wq.bits, wq.group_size)));
    }
    if wq.k % wq.group_size as usize != 0 || wq.n == 0 || wq.k == 0 || wq.n >= (1 << 31) || wq.k >= (1 << 31) {
        return Err(inv(format!("{what}: bad shape N={} K={} (K a positive multiple of the group size {})", wq.n, wq.k, wq.group_size)));
    }
    aligned(wq.w, 16, what)
}

/// Every kernel symbol of the `fused_{tag}` module (for the catalog's compile check).
pub fn fused_fn_names(tag: &str) -> Vec<String> {
    let mut v = Vec::new();
    for b in QMV_BITS {
        for g in QMV_GROUPS {
            v.push(format!("fused_swiglu_{tag}_b{b}_g{g}_r1"));
            v.push(format!("fused_swiglu_{tag}_b{b}_g{g}_r2"));
            for r in [1, 2, 4] {
                v.push(format!("fused_combine_{tag}_b{b}_g{g}_r{r}"));
            }
            v.push(format!("fused_gating_{tag}_b{b}_g{g}"));
        }
    }
    v.push(format!("fused_add_rms_norm_{tag}"));
    v.push(format!("fused_qmv_multi_{tag}"));
    if tag != "f32" {
        for g in QMV_GROUPS {
            v.push(format!("fused_swiglu_tc_{tag}_g{g}"));
            v.push(format!("fused_combine_tc_{tag}_g{g}"));
            v.push(format!("fused_moe_experts_{tag}_g{g}_r1"));
            v.push(format!("fused_moe_experts_{tag}_g{g}_r2"));
        }
        v.push(format!("fused_qmv_multi_tc_{tag}"));
    }
    v
}

/// Routing inside the expert kernels (pattern `moe_topk_experts`): instead of ids and weights
/// from a softmax_topk launch, every block of [`gather_qmm_swiglu_routed`] /
/// [`gather_qmm_combine_routed`] computes them from the router's logits `[n_experts]` with
/// softmax_topk's own warp code (probabilities rounded to the dtype, as the engine's top-k),
/// so the results are bitwise those of softmax_topk + the two kernels, one launch fewer.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub logits: u64,
    pub n_experts: usize,
    pub renorm: bool,
}

/// Largest expert count and top-k the routed kernels take (softmax_topk's warp path).
pub const ROUTED_MAX_EXPERTS: usize = 256;
pub const ROUTED_MAX_K: usize = 32;

/// Why the routed expert kernels cannot route `k` of `n_experts`, if they cannot.
pub fn routing_unsupported(n_experts: usize, k: usize) -> Option<String> {
    (n_experts == 0 || n_experts > ROUTED_MAX_EXPERTS || k == 0 || k > ROUTED_MAX_K || k > n_experts)
        .then(|| format!("routing in the expert kernels takes up to {ROUTED_MAX_EXPERTS} experts and top-k up to {ROUTED_MAX_K} (have {n_experts}, {k})"))
}

fn routing_args(routing: Option<Routing>, k: usize) -> Result<(u64, i32, i32)> {
    match routing {
        None => Ok((0, 0, 0)),
        Some(r) => match routing_unsupported(r.n_experts, k) {
            Some(why) => Err(inv(why)),
            None => Ok((r.logits, r.n_experts as i32, r.renorm as i32)),
        },
    }
}

/// `act[k, N] = swiglu(gather_qmv(gate), gather_qmv(up))` in one launch: for slot i,
/// expert `ids[i]`, the gate and up rows are computed by one warp with qmv's exact per-row
/// code (x shared, `[K]`), rounded to `dt` as qmv stores them, then swiglu with its per-op
/// rounding. Bitwise identical to gather_qmv gate + gather_qmv up + swiglu.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_swiglu(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, ids: u64, k: usize, x: u64, act: u64) -> Result<()> {
    gather_qmm_swiglu_rows(dev, dt, gate, up, ids, k, x, act, 1, 128)
}

/// [`gather_qmm_swiglu`] with an explicit number of gate/up row pairs per warp (`r`: 1 or 2)
/// and block size (`threads`: 32..=256, a multiple of 32); results do not depend on them.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_swiglu_rows(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, ids: u64, k: usize, x: u64, act: u64, r: u32, threads: u32) -> Result<()> {
    swiglu_launch(dev, dt, gate, up, ids, None, k, x, act, r, threads)
}

/// [`gather_qmm_swiglu`] with the routing computed in each block from the router's logits
/// (`moe_topk_experts`): the same act, bitwise, as softmax_topk then gather_qmm_swiglu.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_swiglu_routed(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, routing: Routing, k: usize, x: u64, act: u64) -> Result<()> {
    swiglu_launch(dev, dt, gate, up, 0, Some(routing), k, x, act, 1, 128)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu_launch(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, ids: u64, routing: Option<Routing>, k: usize, x: u64, act: u64, r: u32, threads: u32) -> Result<()> {
    check_q(gate, "gate")?;
    check_q(up, "up")?;
    if (gate.n, gate.k, gate.bits, gate.group_size, gate.n_experts) != (up.n, up.k, up.bits, up.group_size, up.n_experts) {
        return Err(inv("gather_qmm_swiglu: gate and up must have the same shape and quantization".into()));
    }
    aligned(up.w, 16, "up")?;
    aligned(x, 16, "x")?;
    if (ids == 0 && routing.is_none()) || k == 0 || !(r == 1 || r == 2) || threads % 32 != 0 || !(32..=256).contains(&threads) {
        return Err(inv("gather_qmm_swiglu needs expert ids or routing, k > 0, r in {1, 2}, threads 32..=256".into()));
    }
    let (logits, n_experts, _) = routing_args(routing, k)?;
    let tag = dtype_tag(dt)?;
    let mut args = [gate.args(), up.args()].concat();
    args.extend([
        Arg::Ptr(ids),
        Arg::Ptr(logits),
        Arg::I32(n_experts),
        Arg::Ptr(x),
        Arg::Ptr(act),
        Arg::I32(gate.n as i32),
        Arg::I32(gate.k as i32),
    ]);
    if uses_tc4(dev, dt, gate) {
        // One 16-row tile of gate and up per block (r and threads do not apply).
        let name = format!("fused_swiglu_tc_{tag}_g{}", gate.group_size);
        return dev.launch(&name, ((gate.n as u32).div_ceil(16), k as u32, 1), (tc4_threads(2 * tc4_slices(gate.k)), 1, 1), 0, &args);
    }
    args.push(Arg::I32(((1u32 << gate.bits) - 1) as i32)); // qmask
    let rows_per_block = r * threads / 32;
    let name = format!("fused_swiglu_{tag}_b{}_g{}_r{r}", gate.bits, gate.group_size);
    dev.launch(&name, ((gate.n as u32).div_ceil(rows_per_block), k as u32, 1), (threads, 1, 1), 0, &args)
}

/// Down projection of the k experts + weighted sum (+ residual) in one launch:
/// `out[n] = r(residual[n] + m[n])` (or `m[n]` when `residual` is 0), where `m` is exactly
/// moe_combine of `y_j = gather_qmv(down, act_j)`: `m = r(m + r(w_j * r(y_j)))` in list
/// order from 0. One warp per output row computes its k dot products with qmv's per-row
/// code. `weights`: f32 `[k]`; `act`: `[k, K]`; in place (`out == residual`) allowed.
/// Bitwise identical to gather_qmv down + moe_combine (+ add).
/// `ids` must not be written by the kernel launched just before this one (the kernel reads
/// them, and requests the experts' weights, before waiting for that kernel; the MoE order
/// top-k → gather_qmm_swiglu → gather_qmm_combine satisfies it).
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_combine(dev: &CudaDevice, dt: DType, down: &QuantWeight, ids: u64, weights: u64, k: usize, act: u64, residual: u64, out: u64) -> Result<()> {
    // 4 output rows per block: 8.69 µs vs 11.6 (2 rows) on H100 for Qwen3-30B (docs/kernels.md).
    gather_qmm_combine_rows(dev, dt, down, ids, weights, k, act, residual, out, 4)
}

/// [`gather_qmm_combine`] with an explicit number of output rows per block (`r`: 1, 2 or 4;
/// the block has min(k, 8) warps, one slot each in turn); results do not depend on it.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_combine_rows(dev: &CudaDevice, dt: DType, down: &QuantWeight, ids: u64, weights: u64, k: usize, act: u64, residual: u64, out: u64, r: u32) -> Result<()> {
    combine_launch(dev, dt, down, ids, weights, None, k, act, residual, out, r)
}

/// [`gather_qmm_combine`] with the routing computed in each block from the router's logits
/// (`moe_topk_experts`), before the dependency wait (the logits must come from two or more
/// kernels back: router → gather_qmm_swiglu_routed → this). `ids` / `weights` receive the
/// routing (as softmax_topk writes them) for `--routing-stats`; nothing reads them back.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_combine_routed(dev: &CudaDevice, dt: DType, down: &QuantWeight, routing: Routing, ids: u64, weights: u64, k: usize, act: u64, residual: u64, out: u64) -> Result<()> {
    combine_launch(dev, dt, down, ids, weights, Some(routing), k, act, residual, out, 4)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn combine_launch(dev: &CudaDevice, dt: DType, down: &QuantWeight, ids: u64, weights: u64, routing: Option<Routing>, k: usize, act: u64, residual: u64, out: u64, r: u32) -> Result<()> {
    check_q(down, "down")?;
    aligned(act, 16, "act")?;
    if ids == 0 || weights == 0 || k == 0 || k > 4096 || ![1, 2, 4].contains(&r) {
        return Err(inv("gather_qmm_combine needs expert ids, weights, 0 < k <= 4096, r in {1, 2, 4}".into()));
    }
    let (logits, n_experts, renorm) = routing_args(routing, k)?;
    let tag = dtype_tag(dt)?;
    let mut args = down.args().to_vec();
    args.extend([
        Arg::Ptr(ids),
        Arg::Ptr(weights),
        Arg::Ptr(logits),
        Arg::I32(n_experts),
        Arg::I32(renorm),
        Arg::I32(k as i32),
        Arg::Ptr(act),
        Arg::Ptr(residual),
        Arg::Ptr(out),
        Arg::I32(down.n as i32),
        Arg::I32(down.k as i32),
    ]);
    if uses_tc4(dev, dt, down) {
        // One 16-row output tile per block; its warps walk the (slot, slice) pairs.
        let slices = tc4_slices(down.k);
        let smem = k * slices * 16 * 4;
        if smem > 48 * 1024 {
            return Err(inv(format!("gather_qmm_combine: k={k} with K={} needs {smem} bytes of shared memory (> 48 KiB)", down.k)));
        }
        let name = format!("fused_combine_tc_{tag}_g{}", down.group_size);
        return dev.launch(&name, ((down.n as u32).div_ceil(16), 1, 1), (tc4_threads(k * slices), 1, 1), smem as u32, &args);
    }
    args.push(Arg::I32(((1u32 << down.bits) - 1) as i32)); // qmask
    let name = format!("fused_combine_{tag}_b{}_g{}_r{r}", down.bits, down.group_size);
    dev.launch(&name, ((down.n as u32).div_ceil(r), 1, 1), (32 * k.min(8) as u32, 1, 1), (k * r as usize * 4) as u32, &args)
}

/// Bytes of the [`moe_experts`] workspace (its grid barrier's arrival counter): zero it once
/// after allocating; it only grows, by the grid size per call (so one workspace must serve
/// one grid size: one kernel geometry per process, see [`moe_experts_grid`]).
pub const MOE_EXPERTS_WORKSPACE_BYTES: usize = 8;

/// Threads per block and gate/up rows per warp of [`moe_experts`] (`ZMLX_MOE_EXPERTS=threads,rows`
/// overrides them for measurements; results do not depend on them).
fn moe_experts_geometry() -> (u32, u32) {
    static G: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *G.get_or_init(|| {
        let env = std::env::var("ZMLX_MOE_EXPERTS").ok();
        let parsed = env.as_deref().and_then(|v| {
            let (t, r) = v.split_once(',')?;
            let (t, r) = (t.trim().parse::<u32>().ok()?, r.trim().parse::<u32>().ok()?);
            (t % 32 == 0 && (64..=if r == 1 { 768 } else { 512 }).contains(&t) && (r == 1 || r == 2)).then_some((t, r))
        });
        if let (Some(v), None) = (&env, parsed) {
            eprintln!("warning: ZMLX_MOE_EXPERTS={v} ignored (want threads,rows: rows 1 with 64..=768 threads or 2 with 64..=512, threads a multiple of 32); using 768,1");
        }
        parsed.unwrap_or((768, 1))
    })
}

/// Dynamic shared memory of [`moe_experts`]: the down tile of the k experts (words, scales,
/// biases of 16 rows each), act of the k slots, and the tc4 partials.
fn moe_experts_smem(dt: DType, down: &QuantWeight, k: usize) -> usize {
    let es = dt.size_bytes();
    let slices = tc4_slices(down.k);
    // down rows padded to 16 words mod 32 (kernels/fused.cu, moe_experts_row_words)
    let wpr = down.k / 8;
    let row_words = wpr + (16 + 32 - wpr % 32) % 32;
    k * 16 * (row_words * 4 + 2 * (down.k / down.group_size as usize) * es) + k * down.k * es + k * slices * 16 * 4
}

/// Why [`moe_experts`] cannot run these experts here (None: it can): it needs 4-bit bf16/f16
/// experts with one group size, gate/up on the FFMA path and down on the tc4 path
/// ([`uses_tc4`]), a hidden size that is a multiple of 16, and a grid that fits at once.
pub fn moe_experts_unsupported(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, down: &QuantWeight, k: usize) -> Option<String> {
    if let Some(why) = moe_experts_shape_error(dev, dt, gate, up, down, k) {
        return Some(why);
    }
    moe_experts_grid(dev, dt, down, k).err().map(|e| e.to_string())
}

/// The checks of [`moe_experts_unsupported`] that do not need the grid.
fn moe_experts_shape_error(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, down: &QuantWeight, k: usize) -> Option<String> {
    let same = |a: &QuantWeight| (a.bits, a.group_size, a.n, a.k) == (4, down.group_size, gate.n, gate.k);
    if !matches!(dt, DType::BF16 | DType::F16) || down.bits != 4 || !same(gate) || !same(up) {
        return Some("needs 4-bit bf16/f16 experts with one group size".into());
    }
    if down.k != gate.n || down.n != gate.k || down.n % 16 != 0 || k == 0 || k > 64 {
        return Some(format!("shapes: gate/up {}x{}, down {}x{}, k={k}", gate.n, gate.k, down.n, down.k));
    }
    if uses_tc4(dev, dt, gate) || !uses_tc4(dev, dt, down) {
        return Some("needs gate/up on the FFMA path and down on the tensor-core path (ops::uses_tc4)".into());
    }
    None
}

/// [`moe_experts`]' kernel name, blocks (every block resident at once: the barrier waits for
/// all of them; no more than that), threads per block and dynamic shared memory; an error when
/// not even one block fits.
pub fn moe_experts_grid(dev: &CudaDevice, dt: DType, down: &QuantWeight, k: usize) -> Result<(String, u32, u32, u32)> {
    let (threads, r) = moe_experts_geometry();
    let name = format!("fused_moe_experts_{}_g{}_r{r}", dtype_tag(dt)?, down.group_size);
    let smem = moe_experts_smem(dt, down, k) as u32;
    let blocks = dev.resident_blocks(&name, threads, smem)?;
    if blocks == 0 {
        return Err(inv(format!("a block of {threads} threads with {smem} bytes of shared memory does not fit")));
    }
    Ok((name, blocks, threads, smem))
}

/// gather_qmm_swiglu + gather_qmm_combine in ONE launch (a persistent grid with a grid-wide
/// barrier between the gate/up and the down phase; the down weights of each block's output
/// tile are copied into shared memory while gate/up run). Same arguments and results as the
/// two calls `gather_qmm_swiglu(gate, up, ids, k, x, act)` then `gather_qmm_combine(down, ids,
/// weights, k, act, residual, out)`, bitwise; `act` is written too. `bar`: an
/// [`MOE_EXPERTS_WORKSPACE_BYTES`] workspace, zeroed once. Check [`moe_experts_unsupported`] first.
#[allow(clippy::too_many_arguments)]
pub fn moe_experts(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, down: &QuantWeight, ids: u64, weights: u64, k: usize, x: u64, act: u64, residual: u64, out: u64, bar: u64) -> Result<()> {
    moe_experts_partial(dev, dt, gate, up, down, ids, weights, k, x, act, residual, out, bar, 0)
}

/// [`moe_experts`] stopped early, to time its phases (benchmarks only; `out` is not written):
/// `stop_after` 1 = after gate/up (act written), 2 = after the grid barrier, 3 = after act and
/// the down tile are in shared memory, 4 = after the down rows' partial sums, 5 = gate/up only
/// without copying the down tile, 0 = the whole kernel.
#[allow(clippy::too_many_arguments)]
pub fn moe_experts_partial(dev: &CudaDevice, dt: DType, gate: &QuantWeight, up: &QuantWeight, down: &QuantWeight, ids: u64, weights: u64, k: usize, x: u64, act: u64, residual: u64, out: u64, bar: u64, stop_after: i32) -> Result<()> {
    if let Some(why) = moe_experts_shape_error(dev, dt, gate, up, down, k) {
        return Err(inv(format!("moe_experts: {why}")));
    }
    for (p, what) in [(up.w, "up"), (down.w, "down"), (x, "x"), (act, "act"), (down.scales, "down scales"), (down.biases, "down biases"), (bar, "barrier")] {
        aligned(p, if what == "barrier" { 8 } else { 16 }, what)?;
    }
    if ids == 0 || weights == 0 {
        return Err(inv("moe_experts needs expert ids and weights".into()));
    }
    let (name, blocks, threads, smem) = moe_experts_grid(dev, dt, down, k).map_err(|e| inv(format!("moe_experts: {e}")))?;
    let mut args = [gate.args(), up.args(), down.args()].concat();
    args.extend([
        Arg::Ptr(ids),
        Arg::Ptr(weights),
        Arg::I32(k as i32),
        Arg::Ptr(x),
        Arg::Ptr(act),
        Arg::Ptr(residual),
        Arg::Ptr(out),
        Arg::I32(down.n as i32),
        Arg::I32(down.k as i32),
        Arg::I32(15), // qmask (4-bit)
        Arg::Ptr(bar),
        Arg::I32(stop_after),
    ]);
    dev.launch(&name, (blocks, 1, 1), (threads, 1, 1), smem, &args)
}

/// `h = r(x + delta)` (stored to `h_out`; `h_out == x` allowed) and `normed = rms_norm(h, w)`
/// in one launch, over one row of `n`. Bitwise identical to add + rms_norm (same block size
/// and reduction order as [`crate::ops::rms_norm`]).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(dev: &CudaDevice, dt: DType, x: u64, delta: u64, w: u64, h_out: u64, normed_out: u64, n: usize, eps: f32) -> Result<()> {
    let tag = dtype_tag(dt)?;
    // rms_norm's block size: the reduction order depends on it.
    dev.launch(
        &format!("fused_add_rms_norm_{tag}"),
        (1, 1, 1),
        (rms_norm_threads(n), 1, 1),
        0,
        &[Arg::Ptr(x), Arg::Ptr(delta), Arg::Ptr(w), Arg::Ptr(h_out), Arg::Ptr(normed_out), Arg::I32(n as i32), Arg::F32(eps), Arg::F32(rms_norm_inv_n(n))],
    )
}

/// Bytes of the [`moe_gating`] workspace for `e` experts: zero it once after allocating;
/// the kernel leaves its counter zeroed after every call (graph replays need no memset).
pub fn moe_gating_workspace_bytes(e: usize) -> usize {
    16 + 4 * e
}

/// Largest hidden size [`moe_gating`] and [`norm_router`] take (their blocks are rms_norm's, ≤ 512 threads).
pub const MOE_GATING_MAX_K: usize = 4096;

/// [Post-attention RMSNorm +] router matvec + softmax + top-k (+ renorm) in one launch:
/// with `norm_w`, `xn = rms_norm(h, norm_w)` (stored to `xn_out` for the experts); with
/// `norm_w` 0, `h` is already normalised (`xn_out` unused). logits = qmv(router, xn) rounded
/// to `dt`, then one block runs softmax_topk's exact code on them (block 0 of a thread block
/// cluster on sm_90, else the last block to finish). E = `router.n`, K = `router.k` (≤
/// [`MOE_GATING_MAX_K`]). ids: u32 `[k]`, weights: f32 `[k]`. Bitwise identical to [rms_norm +]
/// qmv + softmax_topk(rows = 1, same `round_probs`, `renorm`).
#[allow(clippy::too_many_arguments)]
pub fn moe_gating(dev: &CudaDevice, dt: DType, router: &QuantWeight, h: u64, norm_w: u64, eps: f32, xn_out: u64, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64, workspace: u64) -> Result<()> {
    moe_gating_with(dev, dt, router, h, norm_w, eps, xn_out, k, round_probs, renorm, ids, weights, workspace, true)
}

/// [`moe_gating`] with the cluster handoff (sm_90) allowed or not (the self-tests run both).
#[allow(clippy::too_many_arguments)]
pub fn moe_gating_with(dev: &CudaDevice, dt: DType, router: &QuantWeight, h: u64, norm_w: u64, eps: f32, xn_out: u64, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64, workspace: u64, allow_cluster: bool) -> Result<()> {
    aligned(workspace, 16, "gating workspace")?;
    let e = router.n;
    if k == 0 || k > 64 || k > e {
        return Err(inv(format!("moe_gating: k={k}, E={e} unsupported (k <= 64, k <= E)")));
    }
    gating_launch(dev, dt, router, h, norm_w, eps, xn_out, 0, k, round_probs, renorm, ids, weights, workspace, allow_cluster)
}

/// Post-attention RMSNorm + router matvec in one launch (no grid-wide handoff; the top-k is
/// the separate `ops::softmax_topk`): `xn = rms_norm(h, norm_w)` (to `xn_out`) and `logits =
/// qmv(router, xn)` (to `logits_out`, `[E]` in `dt`). Bitwise identical to rms_norm + qmv.
#[allow(clippy::too_many_arguments)]
pub fn norm_router(dev: &CudaDevice, dt: DType, router: &QuantWeight, h: u64, norm_w: u64, eps: f32, xn_out: u64, logits_out: u64) -> Result<()> {
    if logits_out == 0 || norm_w == 0 {
        return Err(inv("norm_router needs a logits buffer and the norm weight".into()));
    }
    gating_launch(dev, dt, router, h, norm_w, eps, xn_out, logits_out, 1, true, false, 0, 0, 0, false)
}

#[allow(clippy::too_many_arguments)]
fn gating_launch(dev: &CudaDevice, dt: DType, router: &QuantWeight, h: u64, norm_w: u64, eps: f32, xn_out: u64, logits_out: u64, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64, workspace: u64, allow_cluster: bool) -> Result<()> {
    check_q(router, "router")?;
    if uses_tc4(dev, dt, router) {
        // A router on the tensor-core path: its logits must be qmv's, whose row order the
        // gating kernel's FFMA loop does not have, so run the unfused launches (same results).
        let xn = if norm_w != 0 {
            crate::ops::rms_norm(dev, dt, h, norm_w, xn_out, 1, router.k, eps)?;
            xn_out
        } else {
            h
        };
        if logits_out != 0 {
            return crate::ops::qmv(dev, dt, router, xn, logits_out);
        }
        let logits = workspace + 16;
        crate::ops::qmv(dev, dt, router, xn, logits)?;
        return crate::ops::softmax_topk(dev, dt, logits, 1, router.n, k, round_probs, renorm, ids, weights);
    }
    let (e, kk) = (router.n, router.k);
    if e > 8192 || kk > MOE_GATING_MAX_K {
        return Err(inv(format!("router E={e}, K={kk} unsupported (E <= 8192, K <= {MOE_GATING_MAX_K})")));
    }
    let tag = dtype_tag(dt)?;
    // rms_norm's block size for K: the prologue's reduction order depends on it.
    let threads = rms_norm_threads(kk);
    let name = format!("fused_gating_{tag}_b{}_g{}", router.bits, router.group_size);
    let blocks = (e as u32).div_ceil(threads / 32);
    // With the whole grid as one cluster, the logits meet in block 0's shared memory after
    // one cluster barrier, instead of a last-block handoff through global memory.
    // xn (K floats, with the norm) and softmax_topk's scratch (E floats) share one buffer.
    let smem = (if norm_w != 0 { e.max(kk) } else { e } * 4) as u32;
    let cluster_smem = smem + (e * dt.size_bytes()) as u32;
    let cluster = allow_cluster && logits_out == 0 && dev.cluster_fits(&name, blocks, threads, cluster_smem, blocks)?;
    let mut args = router.args().to_vec();
    args.extend([
        Arg::Ptr(h),
        Arg::Ptr(norm_w),
        Arg::Ptr(xn_out),
        Arg::Ptr(logits_out),
        Arg::Ptr(ids),
        Arg::Ptr(weights),
        Arg::Ptr(workspace),
        Arg::I32(e as i32),
        Arg::I32(kk as i32),
        Arg::I32(k as i32),
        Arg::I32(round_probs as i32),
        Arg::I32(renorm as i32),
        Arg::I32(((1u32 << router.bits) - 1) as i32),
        Arg::F32(eps),
        Arg::F32(rms_norm_inv_n(kk)),
        Arg::I32(cluster as i32),
    ]);
    dev.launch_in_cluster(&name, (blocks, 1, 1), (threads, 1, 1), if cluster { cluster_smem } else { smem }, &args, if cluster { blocks } else { 0 })
}

/// One to three quantized matrix-vector products sharing x `[K]` in one launch (e.g. the
/// q, k and v projections): `ys[i] = ws[i]·x`. The matrices need the same K (any N; each
/// its own bits and group size; plain matrices, not stacked). Every output row is computed
/// by qmv's per-row code (one warp per row), so each `ys[i]` is bitwise `qmv(ws[i], x)`.
pub fn qmv_multi(dev: &CudaDevice, dt: DType, ws: &[QuantWeight], x: u64, ys: &[u64]) -> Result<()> {
    if ws.is_empty() || ws.len() > 3 || ws.len() != ys.len() {
        return Err(inv("qmv_multi: 1 to 3 matrices, one output each".into()));
    }
    for (i, w) in ws.iter().enumerate() {
        check_q(w, "qmv_multi weight")?;
        if w.k != ws[0].k {
            return Err(inv(format!("qmv_multi: matrix {i} has K={} (matrix 0: K={})", w.k, ws[0].k)));
        }
    }
    aligned(x, 16, "x")?;
    let tag = dtype_tag(dt)?;
    let tc = ws.iter().filter(|w| uses_tc4(dev, dt, w)).count();
    if tc > 0 && tc < ws.len() {
        // Mixed paths (e.g. a 4-bit q with an 8-bit v): one qmv each, so every output is qmv's.
        for (w, y) in ws.iter().zip(ys) {
            crate::ops::qmv(dev, dt, w, x, *y)?;
        }
        return Ok(());
    }
    let total: usize = ws.iter().map(|w| w.n).sum();
    if total >= (1 << 31) {
        return Err(inv("qmv_multi: too many rows".into()));
    }
    let mut args = vec![Arg::Ptr(x), Arg::I32(ws[0].k as i32)];
    for i in 0..3 {
        match ws.get(i) {
            Some(w) => args.extend([
                Arg::Ptr(w.w),
                Arg::Ptr(w.scales),
                Arg::Ptr(w.biases),
                Arg::Ptr(ys[i]),
                Arg::I32(w.n as i32),
                Arg::I32(if tc > 0 { w.group_size as i32 } else { (w.bits * 1000 + w.group_size) as i32 }),
            ]),
            None => args.extend([Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0), Arg::I32(0)]),
        }
    }
    if tc > 0 {
        // One 16-row tile (of one matrix) per block, its warps over the row's slices.
        let tiles: usize = ws.iter().map(|w| w.n.div_ceil(16)).sum();
        return dev.launch(&format!("fused_qmv_multi_tc_{tag}"), (tiles as u32, 1, 1), (tc4_threads(tc4_slices(ws[0].k)), 1, 1), 0, &args);
    }
    dev.launch(&format!("fused_qmv_multi_{tag}"), ((total as u32).div_ceil(4), 1, 1), (128, 1, 1), 0, &args)
}

/// The q, k and v projections in one launch: [`qmv_multi`] with `[q, k, v]`; bitwise
/// identical to `qmv(q, x, yq)`, `qmv(k, x, yk)`, `qmv(v, x, yv)`.
#[allow(clippy::too_many_arguments)]
pub fn qkv(dev: &CudaDevice, dt: DType, q: &QuantWeight, k: &QuantWeight, v: &QuantWeight, x: u64, yq: u64, yk: u64, yv: u64) -> Result<()> {
    qmv_multi(dev, dt, &[*q, *k, *v], x, &[yq, yk, yv])
}
