//! Rust launchers for the catalog kernels. All pointers are device addresses (`u64`);
//! every launcher checks shapes and alignment, then enqueues on the device's stream
//! (capturable into a graph). Rounding contracts: docs/kernels.md.

use zmlx_core::sampling::SampleParams;
use zmlx_core::DType;

use crate::catalog::{dtype_tag, qmv_fn_name};
use crate::runtime::{Arg, CudaDevice};
use crate::{CudaError, Result};

pub(crate) fn inv(msg: String) -> CudaError {
    CudaError::Invalid(msg)
}

pub(crate) fn aligned(p: u64, a: u64, what: &str) -> Result<()> {
    if p % a != 0 {
        return Err(inv(format!("{what} pointer {p:#x} must be {a}-byte aligned")));
    }
    Ok(())
}

/// An MLX affine-quantized weight on the device: `w` u32 words `[E, N, K*bits/32]`,
/// `scales`/`biases` `[E, N, K/group_size]` in the compute dtype. `n_experts` = 1 for a plain matrix.
#[derive(Clone, Copy, Debug)]
pub struct QuantWeight {
    pub w: u64,
    pub scales: u64,
    pub biases: u64,
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group_size: u32,
    pub n_experts: usize,
}

impl QuantWeight {
    /// The kernel arguments of the weight: words, scales, biases (every quantized kernel takes them in this order).
    pub fn args(&self) -> [Arg; 3] {
        [Arg::Ptr(self.w), Arg::Ptr(self.scales), Arg::Ptr(self.biases)]
    }

    /// Bytes of one expert's packed words, scales and biases (for bandwidth accounting).
    pub fn bytes_per_expert(&self, dt: DType) -> usize {
        let groups = self.n * self.k / self.group_size as usize;
        self.n * self.k * self.bits as usize / 8 + 2 * groups * dt.size_bytes()
    }
    fn validate(&self) -> Result<()> {
        if !crate::catalog::QMV_BITS.contains(&self.bits) || !crate::catalog::QMV_GROUPS.contains(&self.group_size) {
            return Err(inv(format!("unsupported quantization bits={} group={}", self.bits, self.group_size)));
        }
        if self.k % self.group_size as usize != 0 || self.n == 0 || self.k == 0 {
            return Err(inv(format!("K={} must be a positive multiple of the group size {}", self.k, self.group_size)));
        }
        if self.n >= (1 << 31) || self.k >= (1 << 31) {
            return Err(inv("matrix too large".into()));
        }
        aligned(self.w, 16, "weight")
    }
}

/// Rows per warp of qmv launches with many rows (the lm_head, big projections).
pub const QMV_ROWS_BIG: u32 = 4;

/// Largest K of the tensor-core path (64 slices of 16 chunks of 32 codes: kernels/qmv.cu).
pub const TC4_MAX_K: usize = 32768;
/// Most warps of one tc4 block (TC_MAX_WARPS in kernels/qmv.cu).
const TC4_MAX_WARPS: usize = 16;
/// Codes per warp slice on the tc4 path (TC_SLICE chunks of 32).
const TC4_SLICE: usize = 16 * 32;

/// Whether matvecs with this weight run on the tensor-core path ("tc4", kernels/qmv.cu):
/// 4-bit weights, bf16/f16 activations, sm_80 or newer, K ≤ [`TC4_MAX_K`], and a matrix of
/// a shape where it measured faster than the FFMA loop (H100, docs/kernels.md "Fifth pass"):
/// at least 2^20 codes and either very many rows (the lm_head: 76 vs 86 µs) or short rows
/// (K ≤ 1024, e.g. the MoE down projection: combine 7.0 vs 7.6 µs). The shape rule depends on
/// the matrix alone and every launcher asks this same question, so a row is computed the same
/// way fused or not (the path sums in another order than the FFMA loop: the two never mix).
/// `ZMLX_TC=0` turns it off, `ZMLX_TC=all` turns the shape rule off (A/B runs), as does
/// [`Tc4Forced`] (tests).
pub fn uses_tc4(dev: &CudaDevice, dt: DType, wq: &QuantWeight) -> bool {
    static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| std::env::var("ZMLX_TC").ok());
    let off = env.as_deref() == Some("0");
    let sm = dev.compute_capability();
    let shape = wq.n * wq.k >= 1 << 20 && (wq.n >= 65536 || wq.k <= 1024);
    let forced = TC4_FORCED.load(std::sync::atomic::Ordering::Relaxed) || env.as_deref() == Some("all");
    !off && wq.bits == 4 && matches!(dt, DType::BF16 | DType::F16) && sm >= 80 && wq.k <= TC4_MAX_K && (shape || forced)
}

static TC4_FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// While alive, every eligible 4-bit matrix takes the tensor-core path whatever its shape (the
/// self-tests use it to cover the path on small shapes and the fused kernels' tc4 versions).
pub struct Tc4Forced(());

impl Tc4Forced {
    pub fn new() -> Self {
        TC4_FORCED.store(true, std::sync::atomic::Ordering::Relaxed);
        Tc4Forced(())
    }
}

impl Default for Tc4Forced {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Tc4Forced {
    fn drop(&mut self) {
        TC4_FORCED.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Warp slices of a row of `k` codes on the tc4 path.
pub(crate) fn tc4_slices(k: usize) -> usize {
    k.div_ceil(TC4_SLICE)
}

/// Threads of a tc4 block walking `work` (item, slice) pairs: one warp each, at most 16.
pub(crate) fn tc4_threads(work: usize) -> u32 {
    32 * work.clamp(1, TC4_MAX_WARPS) as u32
}

#[allow(clippy::too_many_arguments)]
fn qmv_launch(dev: &CudaDevice, dt: DType, wq: &QuantWeight, x: u64, y: u64, ids: u64, slots: usize, x_stride: usize, residual: u64, rows_big: u32) -> Result<()> {
    wq.validate()?;
    aligned(x, 16, "x")?;
    let tag = dtype_tag(dt)?;
    let n = wq.n as u32;
    let mut args = wq.args().to_vec();
    args.extend([
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::Ptr(ids),
        Arg::I32(wq.n as i32),
        Arg::I32(wq.k as i32),
        Arg::I32(x_stride as i32),
    ]);
    if uses_tc4(dev, dt, wq) {
        // One 16-row tile per block, its warps over the row's slices.
        args.push(Arg::Ptr(residual));
        let name = crate::catalog::qmv_tc_fn_name(tag, wq.group_size);
        return dev.launch(&name, (n.div_ceil(16), slots as u32, 1), (tc4_threads(tc4_slices(wq.k)), 1, 1), 0, &args);
    }
    args.extend([Arg::I32(((1u32 << wq.bits) - 1) as i32), Arg::Ptr(residual)]); // qmask: must be 2^bits - 1
    // Many rows: R rows per warp, 8 warps (loads of R rows in flight per lane). Few rows:
    // 1 row per warp, 4 warps, so the grid still covers every SM.
    let big = (n as u64).div_ceil(32) * slots as u64 >= 2 * dev.sm_count() as u64;
    let (r, threads) = if big { (rows_big, 256u32) } else { (1, 128) };
    let rows_per_block = r * threads / 32;
    dev.launch(&qmv_fn_name(tag, wq.bits, wq.group_size, r), (n.div_ceil(rows_per_block), slots as u32, 1), (threads, 1, 1), 0, &args)
}

/// y[N] = W·x for a quantized W [N, K]; x [K], y [N] in `dt`. f32 accumulation, output
/// rounded to `dt`.
pub fn qmv(dev: &CudaDevice, dt: DType, wq: &QuantWeight, x: u64, y: u64) -> Result<()> {
    qmv_launch(dev, dt, wq, x, y, 0, 1, 0, 0, QMV_ROWS_BIG)
}

/// [`qmv`] with `rows` (1 or 4) rows per warp when the matrix is large (tests, benchmarks).
pub fn qmv_rows(dev: &CudaDevice, dt: DType, wq: &QuantWeight, x: u64, y: u64, rows: u32) -> Result<()> {
    if !crate::catalog::QMV_ROWS.contains(&rows) {
        return Err(inv(format!("qmv rows per warp must be one of {:?}", crate::catalog::QMV_ROWS)));
    }
    qmv_launch(dev, dt, wq, x, y, 0, 1, 0, 0, rows)
}

/// y = residual + W·x in one launch, bitwise `qmv` then `add` (r(res + r(W·x))). y may be
/// the residual buffer itself (each row is read, then written, by one thread).
pub fn qmv_add(dev: &CudaDevice, dt: DType, wq: &QuantWeight, x: u64, residual: u64, y: u64) -> Result<()> {
    if residual == 0 {
        return Err(inv("qmv_add needs a residual".into()));
    }
    qmv_launch(dev, dt, wq, x, y, 0, 1, 0, residual, QMV_ROWS_BIG)
}

/// MoE expert matmuls in one launch: for slot i in 0..k, y[i] = W[ids[i]]·x_i with W
/// stacked `[E, N, K]`, `ids` k u32 expert indices in device memory (must be < E),
/// x_i = x (shared, `x_per_slot` false) or x[i*K..] (`x_per_slot` true); y [k, N].
pub fn gather_qmv(dev: &CudaDevice, dt: DType, wq: &QuantWeight, ids: u64, k: usize, x: u64, x_per_slot: bool, y: u64) -> Result<()> {
    if ids == 0 || k == 0 {
        return Err(inv("gather_qmv needs expert ids and k > 0".into()));
    }
    qmv_launch(dev, dt, wq, x, y, ids, k, if x_per_slot { wq.k } else { 0 }, 0, QMV_ROWS_BIG)
}

/// RMSNorm over `rows` rows of `n`: y = r(r(x * 1/sqrt(mean(x²)+eps)) * w). In place allowed.
pub fn rms_norm(dev: &CudaDevice, dt: DType, x: u64, w: u64, y: u64, rows: usize, n: usize, eps: f32) -> Result<()> {
    let tag = dtype_tag(dt)?;
    dev.launch(
        &format!("rms_norm_{tag}"),
        (rows as u32, 1, 1),
        (rms_norm_threads(n), 1, 1),
        0,
        &[Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(y), Arg::I32(n as i32), Arg::F32(eps), Arg::F32(rms_norm_inv_n(n))],
    )
}

/// rms_norm's block size for rows of `n`: ≤ 8 values per thread (kept in registers) up to
/// n = 8192; one warp minimum. Kernels that reproduce rms_norm bitwise use the same count.
pub(crate) fn rms_norm_threads(n: usize) -> u32 {
    (n.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// The f32 1/n rms_norm's mean uses.
pub(crate) fn rms_norm_inv_n(n: usize) -> f32 {
    (1.0f64 / n as f64) as f32
}

/// The f32 `ln(base) / (dims/2)` step MLX's RoPE fallback uses (zmlx-core `rope_tables`).
pub fn rope_step(base: f32, dims: usize) -> f32 {
    base.ln() / (dims / 2) as f32
}

/// Non-traditional RoPE on `rows` rows of `head_dim` (one token: rows = heads), rotating
/// the first `dims` features, at position `*pos_ptr + pos_add` (i32 in device memory).
/// `scale` multiplies the position (1.0 normally). In place allowed (y == x).
#[allow(clippy::too_many_arguments)]
pub fn rope(dev: &CudaDevice, dt: DType, x: u64, y: u64, pos_ptr: u64, pos_add: i32, rows: usize, head_dim: usize, dims: usize, base: f32, scale: f32) -> Result<()> {
    if dims % 2 != 0 || dims > head_dim {
        return Err(inv(format!("rope dims {dims} must be even and <= head_dim {head_dim}")));
    }
    let tag = dtype_tag(dt)?;
    let work = rows * (dims / 2).max(head_dim - dims);
    dev.launch(
        &format!("rope_{tag}"),
        ((work as u32).div_ceil(128), 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(pos_ptr),
            Arg::I32(pos_add),
            Arg::I32(rows as i32),
            Arg::I32(head_dim as i32),
            Arg::I32(dims as i32),
            Arg::F32(rope_step(base, dims)),
            Arg::F32(scale),
        ],
    )
}

/// Shape of one layer's attention for decode.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// KV cache capacity (positions) per layer: caches are `[n_kv_heads, max_len, head_dim]`.
    pub max_len: usize,
}

/// Positions per split of the long-context attention (the kernel's ATT_CHUNK).
pub const ATT_CHUNK: usize = 128;
/// Largest supported cache length (the long kernel's combine merges ≤ 2048 splits).
pub const ATT_MAX_LEN: usize = 262144;
/// Longest attention the single-launch kernel is chosen for; the split kernel up to
/// [`ATT_SPLIT_MAX_LEN`], the 128-position flash-decoding kernel beyond (H100, Qwen3-30B
/// shapes, crossovers measured in docs/kernels.md).
pub const ATT_SINGLE_MAX_LEN: usize = 384;
/// 2048 since the long kernel loads its K/V rows before the dependency wait (H100, same call,
/// µs): 2048 positions Split(8) 12.08, Long 12.67, Split(16) 14.60; 4096 Long 16.83, Split(8)
/// 19.96, Split(16) 21.62 (docs/kernels.md, "Seventh pass").
pub const ATT_SPLIT_MAX_LEN: usize = 2048;
/// Longest length at which the single-launch attention takes the q/k norm + rope prologue
/// ([`AttnKernel::takes_qk_prologue`]): the crossover of the measurements cited there.
pub const ATT_QK_PROLOGUE_MAX_LEN: usize = 160;

/// Positions per block the split kernel aims at.
pub const ATT_SPLIT_ROWS: usize = 256;
/// Most splits per head the engine picks (the kernel takes up to 64).
pub const ATT_SPLIT_MAX: usize = 16;
/// Most splits per head `attention_decode` takes (the workspace is sized for it).
pub const ATT_SPLIT_KERNEL_MAX: usize = 64;

/// Which decode-attention kernel runs. All compute the same function (f32 scores, MLX exp,
/// f32 sums; they differ only in summation order) for any length ≤ max_len; the choice is
/// speed. `Single`: one launch, one block per query head walking the length in 512-row
/// chunks with an online softmax (smallest fixed cost). `Split(s)`: the same kernel on s
/// blocks per query head (each ⌈len/s⌉ rows, rounded up to 32) writing partials, then a
/// combine launch. `Long`: flash-decoding, one block per (kv head, 128 positions) with all K/V
/// loads in flight, then the combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnKernel {
    Single,
    Split(u32),
    Long,
}

impl AttnKernel {
    /// The kernel for a step whose attention covers at most `len` positions: Single up to
    /// [`ATT_SINGLE_MAX_LEN`], then Split with a power-of-two number of splits (4 to
    /// [`ATT_SPLIT_MAX`]) giving about [`ATT_SPLIT_ROWS`] rows per block, then Long. Few
    /// distinct choices (5), so a decode captures few graphs.
    pub fn for_len(len: usize) -> Self {
        if len <= ATT_SINGLE_MAX_LEN {
            AttnKernel::Single
        } else if len <= ATT_SPLIT_MAX_LEN {
            AttnKernel::Split(len.div_ceil(ATT_SPLIT_ROWS).next_power_of_two().clamp(4, ATT_SPLIT_MAX) as u32)
        } else {
            AttnKernel::Long
        }
    }
    /// One of each, for tests.
    pub const ALL: [AttnKernel; 4] = [AttnKernel::Single, AttnKernel::Split(3), AttnKernel::Split(16), AttnKernel::Long];
    /// Whether the engine runs qk_norm_rope as this kernel's prologue
    /// ([`attention_decode_qk_norm_rope`]) at length `len` instead of its own launch: only the
    /// single-launch kernel, up to [`ATT_QK_PROLOGUE_MAX_LEN`]. Same-call A/Bs on the H100
    /// (`ZMLX_ATTN_PROLOGUE`, scripts/device_env_ab.sh), with vs without it: 128 tokens (lengths
    /// 17..144) 424.1 / 424.7 vs 416.0 / 404.6 tok/s; 360 tokens (17..376) 390.5 / 389.1 / 390.3
    /// vs 395.1 / 395.1 / 395.4; 800 tokens with it on Split(4) as well 384.0 / 383.7 vs 389.0 /
    /// 388.2; the pair's own time 7.21 vs 7.37 µs at 128, 12.87 vs 11.10 at 384.
    pub fn takes_qk_prologue(self, len: usize) -> bool {
        // ZMLX_ATTN_PROLOGUE=0: never (qk_norm_rope_append launches first), for A/B runs.
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("ZMLX_ATTN_PROLOGUE").is_ok_and(|v| v == "0")) {
            return false;
        }
        self == AttnKernel::Single && len <= ATT_QK_PROLOGUE_MAX_LEN
    }
}

impl AttnShape {
    fn splits(&self) -> usize {
        self.max_len.div_ceil(ATT_CHUNK)
    }
    /// f32 scratch the attention needs (reusable across layers; unused by `Single`).
    pub fn workspace_bytes(&self) -> usize {
        self.n_heads * self.splits().max(ATT_SPLIT_KERNEL_MAX) * (self.head_dim + 2) * 4
    }
    fn validate(&self) -> Result<()> {
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(inv(format!("n_heads {} must be a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads)));
        }
        let g = self.n_heads / self.n_kv_heads;
        if g > 16 {
            return Err(inv(format!("GQA group {g} > 16 not supported")));
        }
        if self.max_len > ATT_MAX_LEN || self.max_len == 0 {
            return Err(inv(format!("max_len {} not supported (1..={ATT_MAX_LEN})", self.max_len)));
        }
        if ![16, 32, 64, 128].contains(&self.head_dim) {
            return Err(inv(format!("head_dim {} not supported (16, 32, 64, 128)", self.head_dim)));
        }
        Ok(())
    }
}

/// Append one token's k, v `[n_kv, head_dim]` to the caches at position `*pos_ptr + pos_add`.
#[allow(clippy::too_many_arguments)]
pub fn kv_append(dev: &CudaDevice, dt: DType, s: &AttnShape, k: u64, v: u64, k_cache: u64, v_cache: u64, pos_ptr: u64, pos_add: i32) -> Result<()> {
    let tag = dtype_tag(dt)?;
    let n = (s.n_kv_heads * s.head_dim) as u32;
    dev.launch(
        &format!("kv_append_{tag}"),
        (n.div_ceil(128), 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(k_cache),
            Arg::Ptr(v_cache),
            Arg::Ptr(pos_ptr),
            Arg::I32(pos_add),
            Arg::I32(s.n_kv_heads as i32),
            Arg::I32(s.max_len as i32),
            Arg::I32(s.head_dim as i32),
        ],
    )
}

/// Single-token attention: q `[n_heads, head_dim]` against the first `*len_ptr + len_add`
/// cached positions; out `[n_heads, head_dim]`. q is scaled as MLX does (`r(q * r(scale))`),
/// scores and softmax in f32, output rounded to `dt`. The length is read on the device, so
/// one captured graph serves every length. `kernel` ([`AttnKernel`]): `Single` is one launch
/// on n_heads blocks; `Split(s)` runs it on n_heads × s blocks and `Long` on n_kv ×
/// ⌈max_len/128⌉ blocks (blocks past the length exit), both into `workspace`
/// (`s.workspace_bytes()`, need not be zeroed), then the combine over the active splits.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(dev: &CudaDevice, dt: DType, s: &AttnShape, kernel: AttnKernel, q: u64, k_cache: u64, v_cache: u64, len_ptr: u64, len_add: i32, scale: f32, workspace: u64, out: u64) -> Result<()> {
    attention_decode_with(dev, dt, s, kernel, q, k_cache, v_cache, len_ptr, len_add, scale, workspace, out, None)
}

/// The new token's projections (un-normalised k and v, `[n_kv_heads, head_dim]`) and the
/// q/k norm weights, for [`attention_decode_qk_norm_rope`].
#[derive(Clone, Copy, Debug)]
pub struct QkNormRope {
    pub k: u64,
    pub v: u64,
    pub q_norm_w: u64,
    pub k_norm_w: u64,
    pub eps: f32,
    pub rope_base: f32,
}

/// [`qk_norm_rope_append`] and [`attention_decode`] in one launch (Single and Split kernels):
/// `q` is the un-normalised projection; the new token is at position `*len_ptr + len_add - 1`.
/// Each attention block normalises and rotates its own q head, and the blocks that hold the new
/// position its k head (kept in shared memory and appended to the caches with v). Outputs and
/// caches are bitwise those of the two kernels (q and k are left as they came).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_qk_norm_rope(dev: &CudaDevice, dt: DType, s: &AttnShape, kernel: AttnKernel, q: u64, k_cache: u64, v_cache: u64, len_ptr: u64, len_add: i32, scale: f32, workspace: u64, out: u64, pro: &QkNormRope) -> Result<()> {
    if kernel == AttnKernel::Long {
        return Err(inv("attention with the qk_norm_rope prologue: Single and Split kernels only".into()));
    }
    attention_decode_with(dev, dt, s, kernel, q, k_cache, v_cache, len_ptr, len_add, scale, workspace, out, Some(pro))
}

#[allow(clippy::too_many_arguments)]
fn attention_decode_with(dev: &CudaDevice, dt: DType, s: &AttnShape, kernel: AttnKernel, q: u64, k_cache: u64, v_cache: u64, len_ptr: u64, len_add: i32, scale: f32, workspace: u64, out: u64, pro: Option<&QkNormRope>) -> Result<()> {
    s.validate()?;
    aligned(q, 16, "q")?;
    aligned(k_cache, 16, "k_cache")?;
    aligned(v_cache, 16, "v_cache")?;
    let tag = dtype_tag(dt)?;
    let g = (s.n_heads / s.n_kv_heads) as i32;
    let sp = s.splits() as u32;
    // Pass 1 (the whole attention for Single, which writes `out` directly).
    let (split, grid, splits, chunk) = match kernel {
        AttnKernel::Single => ("attn_single", (s.n_heads as u32, 1, 1), 1, 0),
        AttnKernel::Split(n) => {
            if !(2..=ATT_SPLIT_KERNEL_MAX as u32).contains(&n) {
                return Err(inv(format!("attention splits {n} must be in 2..={ATT_SPLIT_KERNEL_MAX}")));
            }
            ("attn_single", (s.n_heads as u32, n, 1), n, 0)
        }
        AttnKernel::Long => ("attn_split_long", (s.n_kv_heads as u32, sp, 1), sp, ATT_CHUNK as i32),
    };
    let mut args = vec![Arg::Ptr(q), Arg::Ptr(k_cache), Arg::Ptr(v_cache)];
    if kernel == AttnKernel::Long {
        args.push(Arg::Ptr(workspace));
    } else {
        args.extend([Arg::Ptr(out), Arg::Ptr(workspace)]);
    }
    args.extend([Arg::Ptr(len_ptr), Arg::I32(len_add), Arg::I32(g), Arg::I32(s.max_len as i32), Arg::F32(scale)]);
    let mut name = format!("{split}_{tag}_d{}", s.head_dim);
    if let Some(p) = pro {
        let hd = s.head_dim;
        args.extend([Arg::Ptr(p.k), Arg::Ptr(p.v), Arg::Ptr(p.q_norm_w), Arg::Ptr(p.k_norm_w), Arg::F32(p.eps), Arg::F32(rms_norm_inv_n(hd)), Arg::F32(rope_step(p.rope_base, hd))]);
        name = format!("attn_single_qknr_{tag}_d{hd}");
    }
    dev.launch(&name, grid, (256, 1, 1), 0, &args)?;
    if kernel == AttnKernel::Single {
        return Ok(());
    }
    dev.launch(
        &format!("attn_combine_long_{tag}_d{}", s.head_dim),
        (s.n_heads as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(workspace),
            Arg::Ptr(out),
            Arg::Ptr(len_ptr),
            Arg::I32(len_add),
            Arg::I32(g),
            Arg::I32(splits as i32),
            Arg::I32(s.max_len as i32),
            Arg::I32(chunk),
        ],
    )
}

/// Per-head q/k RMSNorm + RoPE + K/V cache append in one launch, for one token:
/// q `[n_heads, head_dim]` and k `[n_kv_heads, head_dim]` are normalised (weights
/// `q_norm_w`/`k_norm_w` `[head_dim]`) and rotated in place (non-traditional RoPE over the
/// whole head, position `*pos_ptr`, scale 1, `rope_base`), then k and v `[n_kv_heads,
/// head_dim]` are written to the caches at `*pos_ptr` (skipped outside 0..max_len). Bitwise
/// identical to `rms_norm(q) + rms_norm(k) + rope(q) + rope(k) + kv_append` (pos_add 0).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_append(dev: &CudaDevice, dt: DType, q: u64, k: u64, v: u64, q_norm_w: u64, k_norm_w: u64, k_cache: u64, v_cache: u64, pos_ptr: u64, shape: &AttnShape, eps: f32, rope_base: f32) -> Result<()> {
    let hd = shape.head_dim;
    if hd == 0 || hd % 2 != 0 || hd > 256 || shape.n_kv_heads == 0 {
        return Err(inv(format!("qk_norm_rope_append: head_dim {hd} must be even and <= 256")));
    }
    let tag = dtype_tag(dt)?;
    let rows = (shape.n_heads + shape.n_kv_heads) as u32;
    let inv_n = rms_norm_inv_n(hd);
    dev.launch(
        &format!("qk_norm_rope_append_{tag}"),
        (rows.div_ceil(4), 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(q_norm_w),
            Arg::Ptr(k_norm_w),
            Arg::Ptr(k_cache),
            Arg::Ptr(v_cache),
            Arg::Ptr(pos_ptr),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(hd as i32),
            Arg::I32(shape.max_len as i32),
            Arg::F32(eps),
            Arg::F32(inv_n),
            Arg::F32(rope_step(rope_base, hd)),
            Arg::F32(1.0),
        ],
    )
}

/// Router: per row of `e` logits, p = softmax (f32, sequential sum as MLX's CPU), top-`k`
/// (ties → lower index, listed by descending p), optional renormalisation
/// w = r(p / r(Σ_f32 p)) (sum in list order). `round_probs`: round p to `dt` as MLX's
/// `softmax(precise=True)` output does. ids: u32 `[rows, k]`; weights: f32 `[rows, k]`
/// holding dt-exact values when `round_probs`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_topk(dev: &CudaDevice, dt: DType, logits: u64, rows: usize, e: usize, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64) -> Result<()> {
    topk_launch(dev, "softmax_topk", dt, logits, rows, e, k, round_probs, renorm, ids, weights)
}

/// The DeepSeek-V3 / Kimi-K2 / GLM-4.x gating for one token in one launch (kernel
/// `group_topk`): router logits [E] in `dt` and the correction bias [E] in f32 to expert ids
/// [k] (u32) and weights [k] (f32), listed by descending score: bit for bit zmlx-core's
/// `group_expert_select` with `SelectOrder::Descending` (the same experts as mlx-lm's, whose
/// argpartition order only changes the f32 sum of the normalisation).
pub fn group_topk(dev: &CudaDevice, dt: DType, logits: u64, bias: u64, e: usize, g: &zmlx_core::ops::GroupGating, ids: u64, weights: u64) -> Result<()> {
    let ok = e <= 1024 && (1..=64).contains(&g.n_group) && e % g.n_group == 0 && g.topk_group <= g.n_group && (1..=64.min(e)).contains(&g.top_k);
    if !ok {
        return Err(inv(format!("group_topk: E={e}, k={}, groups {}/{} unsupported (E <= 1024, E % n_group == 0, n_group <= 64, k <= 64)", g.top_k, g.topk_group, g.n_group)));
    }
    let tag = dtype_tag(dt)?;
    let args = [
        Arg::Ptr(logits),
        Arg::Ptr(bias),
        Arg::Ptr(ids),
        Arg::Ptr(weights),
        Arg::I32(e as i32),
        Arg::I32(g.top_k as i32),
        Arg::I32(g.n_group as i32),
        Arg::I32(g.topk_group as i32),
        Arg::F32(g.routed_scaling_factor),
        Arg::I32(g.norm_topk_prob as i32),
    ];
    dev.launch(&format!("group_topk_{tag}"), (1, 1, 1), (e.div_ceil(32) as u32 * 32, 1, 1), 0, &args)
}

/// The previous softmax_topk kernel (serial shared-memory scans), kept for the bitwise
/// self-test and the before/after benchmark.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn softmax_topk_legacy(dev: &CudaDevice, dt: DType, logits: u64, rows: usize, e: usize, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64) -> Result<()> {
    topk_launch(dev, "softmax_topk_legacy", dt, logits, rows, e, k, round_probs, renorm, ids, weights)
}

/// One warp per row, E floats of shared memory (both top-k kernels take the same arguments).
#[allow(clippy::too_many_arguments)]
fn topk_launch(dev: &CudaDevice, kernel: &str, dt: DType, logits: u64, rows: usize, e: usize, k: usize, round_probs: bool, renorm: bool, ids: u64, weights: u64) -> Result<()> {
    if k == 0 || k > 64 || k > e || e > 8192 {
        return Err(inv(format!("softmax_topk: k={k}, E={e} unsupported (k <= 64, E <= 8192)")));
    }
    let tag = dtype_tag(dt)?;
    dev.launch(
        &format!("{kernel}_{tag}"),
        (rows as u32, 1, 1),
        (32, 1, 1),
        (e * 4) as u32,
        &[
            Arg::Ptr(logits),
            Arg::Ptr(ids),
            Arg::Ptr(weights),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::I32(round_probs as i32),
            Arg::I32(renorm as i32),
        ],
    )
}

fn elementwise(dev: &CudaDevice, name: &str, n: usize, args: &[Arg]) -> Result<()> {
    dev.launch(name, ((n as u32).div_ceil(256), 1, 1), (256, 1, 1), 0, args)
}

/// out[n] = r(Σ_j r(w[j] * y[j, :])): products rounded to `dt`, summed in f32 from 0 in
/// list order, rounded once (MLX 0.32.4's `(y * scores).sum(-2)`); w: f32 `[k]`.
pub fn moe_combine(dev: &CudaDevice, dt: DType, y: u64, w: u64, out: u64, k: usize, n: usize) -> Result<()> {
    let tag = dtype_tag(dt)?;
    elementwise(dev, &format!("moe_combine_{tag}"), n, &[Arg::Ptr(y), Arg::Ptr(w), Arg::Ptr(out), Arg::I32(k as i32), Arg::I32(n as i32)])
}

/// out = silu(g) * u with MLX's sigmoid and per-op rounding.
pub fn swiglu(dev: &CudaDevice, dt: DType, g: u64, u: u64, out: u64, n: usize) -> Result<()> {
    let tag = dtype_tag(dt)?;
    elementwise(dev, &format!("swiglu_{tag}"), n, &[Arg::Ptr(g), Arg::Ptr(u), Arg::Ptr(out), Arg::I32(n as i32)])
}

/// out = r(a + b).
pub fn add(dev: &CudaDevice, dt: DType, a: u64, b: u64, out: u64, n: usize) -> Result<()> {
    let tag = dtype_tag(dt)?;
    elementwise(dev, &format!("add_{tag}"), n, &[Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(out), Arg::I32(n as i32)])
}

/// Dequantize row `*id_ptr` (u32 in device memory) of a quantized table `[vocab, dim]`.
pub fn embed(dev: &CudaDevice, dt: DType, table: &QuantWeight, id_ptr: u64, out: u64) -> Result<()> {
    table.validate()?;
    let tag = dtype_tag(dt)?;
    elementwise(
        dev,
        &format!("embed_{tag}"),
        table.k,
        &[
            Arg::Ptr(table.w),
            Arg::Ptr(table.scales),
            Arg::Ptr(table.biases),
            Arg::Ptr(id_ptr),
            Arg::Ptr(out),
            Arg::I32(table.k as i32),
            Arg::I32(table.bits as i32),
            Arg::I32(table.group_size as i32),
        ],
    )
}

/// Bytes of the argmax workspace: zero it once after allocating; the kernel leaves it
/// zeroed after every call (so graph replays need no memset).
pub const ARGMAX_WORKSPACE_BYTES: usize = 16;

/// Index of the first maximum of x[n] (NaN ignored) → u32 at `out`.
pub fn argmax(dev: &CudaDevice, dt: DType, x: u64, n: usize, workspace: u64, out: u64) -> Result<()> {
    aligned(workspace, 8, "argmax workspace")?;
    let tag = dtype_tag(dt)?;
    let blocks = (n as u32).div_ceil(256 * 8).clamp(1, 2 * dev.sm_count());
    dev.launch(&format!("argmax_{tag}"), (blocks, 1, 1), (256, 1, 1), 0, &[Arg::Ptr(x), Arg::Ptr(out), Arg::Ptr(workspace), Arg::I32(n as i32)])
}

/// Most blocks of [`logprobs_argmax`] (LPA_MAX_BLOCKS in ops.cu).
const LPA_MAX_BLOCKS: usize = 1024;

/// Bytes of the [`logprobs_argmax`] workspace (8,208): zero it (at least its first 16
/// bytes) once after allocating; the kernels leave words 0..1 zeroed after every call
/// (graph replays need no memset); words 2 and 3 hold the last call's largest logprob and
/// lse (f32 bits), which [`sample`] reads.
pub const LOGPROBS_ARGMAX_WORKSPACE_BYTES: usize = 16 + 8 * LPA_MAX_BLOCKS;

/// (blocks, elements per block) of [`logprobs_argmax`] for `n` logits on `dev`. The f32
/// sum's order depends on it (fixed per device and n).
pub fn logprobs_argmax_grid(dev: &CudaDevice, n: usize) -> (usize, usize) {
    let blocks = n.div_ceil(1024).clamp(1, (2 * dev.sm_count() as usize).min(LPA_MAX_BLOCKS));
    (blocks, n.div_ceil(blocks))
}

/// mlx-lm's greedy token: the first index of the maximum of `r(l - lse)`, lse =
/// `r(logf(Σ mlx_exp(l - max)) + max)` (f32 max and sum; `r` rounds to `dt`), written as a
/// u32 at `out`. Not always `argmax(logits)`: subtracting lse and rounding can tie the top
/// logits, and the lowest index wins. Two launches, no host sync (graph-capturable).
/// `workspace`: [`LOGPROBS_ARGMAX_WORKSPACE_BYTES`], zeroed once.
pub fn logprobs_argmax(dev: &CudaDevice, dt: DType, logits: u64, n: usize, workspace: u64, out: u64) -> Result<()> {
    if n == 0 || n >= (1 << 31) {
        return Err(inv(format!("logprobs_argmax: n={n} unsupported")));
    }
    aligned(workspace, 16, "logprobs_argmax workspace")?;
    let tag = dtype_tag(dt)?;
    let (blocks, chunk) = logprobs_argmax_grid(dev, n);
    debug_assert!(blocks <= LPA_MAX_BLOCKS);
    let grid = (blocks as u32, 1, 1);
    dev.launch(&format!("lpa_max_{tag}"), grid, (256, 1, 1), 0, &[Arg::Ptr(logits), Arg::Ptr(workspace), Arg::I32(n as i32), Arg::I32(chunk as i32)])?;
    dev.launch(
        &format!("lpa_select_{tag}"),
        grid,
        (256, 1, 1),
        0,
        &[Arg::Ptr(logits), Arg::Ptr(workspace), Arg::Ptr(out), Arg::I32(n as i32), Arg::I32(chunk as i32)],
    )
}

/// Most blocks of [`sample`] (SMP_MAX_BLOCKS in ops.cu).
const SMP_MAX_BLOCKS: usize = 1024;

/// Bytes of the [`sample`] workspace for `n` logits: zero it once after allocating; the
/// kernels leave their state zeroed after every call (graph replays need no memset).
pub fn sample_workspace_bytes(n: usize) -> usize {
    8 * (16 + 2 * SMP_MAX_BLOCKS + 2 * 2048) + 4 * n.next_multiple_of(2) + 16 * n
}

/// The last [`sample`] call's intermediate results, read back for tests: (Q the top-p mass,
/// v_p, v_k the top-p and top-k boundary keys, W the kept mass, d the draw).
pub fn sample_report(dev: &CudaDevice, workspace: u64) -> Result<[u64; 5]> {
    let h: Vec<u64> = dev.read(workspace, 15)?;
    Ok([h[10], h[11], h[12], h[13], h[14]])
}

/// Sample the next token from `logits` (n values of `dt`) as `zmlx_core::sampling::sample`
/// does, bit for bit, with the random word `step_random(*seed, *pos)` (`seed`: a device u64,
/// `pos`: a device u32); the token goes to
/// `out`. Runs after [`logprobs_argmax`] on the same logits (`lpa_workspace`: its lse and
/// largest logprob; `out`: its greedy token, kept when no maximum is finite). `temp` > 0.
/// 3 to 7 launches (top-p or top-k add a radix select of three passes; top-k one more),
/// no host sync. `workspace`: [`sample_workspace_bytes`], zeroed once.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    dev: &CudaDevice,
    dt: DType,
    logits: u64,
    n: usize,
    lpa_workspace: u64,
    workspace: u64,
    params: &SampleParams,
    seed: u64,
    pos: u64,
    out: u64,
) -> Result<()> {
    if n == 0 || n >= (1 << 30) || !(params.temp > 0.0) || !params.temp.is_finite() {
        return Err(inv(format!("sample: n={n}, temp={} unsupported", params.temp)));
    }
    aligned(workspace, 16, "sample workspace")?;
    let tag = dtype_tag(dt)?;
    let blocks = n.div_ceil(256).clamp(1, (2 * dev.sm_count() as usize).min(SMP_MAX_BLOCKS));
    let chunk = n.div_ceil(blocks);
    let grid = (blocks as u32, 1, 1);
    let top_p_fixed = params.top_p_fixed();
    let top_k = if params.top_k_active(n) { params.top_k as u64 } else { 0 };
    let (lpa, ws, top_p, k) = (Arg::Ptr(lpa_workspace), Arg::Ptr(workspace), Arg::U64(top_p_fixed), Arg::U64(top_k));
    let (n, chunk) = (Arg::I32(n as i32), Arg::I32(chunk as i32));
    // min-p: the kernel adds the largest logprob to this and rounds (SampleParams::min_p_threshold).
    let min_p_log = params.min_p_log(dt);
    let prep_args = [
        Arg::Ptr(logits),
        lpa,
        ws,
        n,
        chunk,
        Arg::F64(params.temp as f64),
        Arg::I32((top_p_fixed != 0) as i32),
        Arg::F32(min_p_log.unwrap_or(0.0)),
        Arg::I32(min_p_log.is_some() as i32),
    ];
    dev.launch(&format!("smp_prep_{tag}"), grid, (256, 1, 1), 0, &prep_args)?;
    if top_p_fixed != 0 || top_k != 0 {
        for pass in 0..3 {
            dev.launch("smp_radix", grid, (256, 1, 1), 0, &[lpa, ws, n, chunk, Arg::I32(pass), top_p, k])?;
        }
    }
    if top_k != 0 {
        dev.launch("smp_ties", grid, (256, 1, 1), 0, &[lpa, ws, n, chunk])?;
    }
    dev.launch("smp_mass", grid, (256, 1, 1), 0, &[lpa, ws, n, chunk, top_p, k, Arg::Ptr(seed), Arg::Ptr(pos)])?;
    dev.launch("smp_pick", (1, 1, 1), (256, 1, 1), 0, &[lpa, ws, Arg::Ptr(out), n, chunk, top_p, k])
}

fn fill_grid(dev: &CudaDevice, n: usize) -> (u32, u32, u32) {
    ((n.div_ceil(256) as u64).clamp(1, 32 * dev.sm_count() as u64) as u32, 1, 1)
}

/// Fill `n` u32 words at `ptr` with a counter-based hash of (seed, index): word i =
/// high 32 bits of SplitMix64 output i from start `mix(seed)` (`reference::fill_hash`).
/// Every bit pattern is possible; the same seed gives the same words.
pub fn fill_random_u32(dev: &CudaDevice, ptr: u64, n: usize, seed: u64) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    aligned(ptr, 4, "fill_random_u32")?;
    dev.launch("fill_random_u32", fill_grid(dev, n), (256, 1, 1), 0, &[Arg::Ptr(ptr), Arg::Ptr(n as u64), Arg::Ptr(seed)])
}

/// Fill `n` values of `dt` at `ptr` uniformly in [lo, hi]: v_i = r(lo + (hi - lo)·u_i),
/// u_i = (hash(seed, i) >> 40)·2⁻²⁴ (f32 ops, no FMA), rounded to `dt`.
#[allow(clippy::too_many_arguments)]
pub fn fill_random_uniform(dev: &CudaDevice, dt: DType, ptr: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let tag = dtype_tag(dt)?;
    dev.launch(
        &format!("fill_random_uniform_{tag}"),
        fill_grid(dev, n),
        (256, 1, 1),
        0,
        &[Arg::Ptr(ptr), Arg::Ptr(n as u64), Arg::Ptr(seed), Arg::F32(lo), Arg::F32(hi)],
    )
}

/// y = r(a·x + b) elementwise over `n` values of `dt` (f32 product, then f32 sum, no FMA;
/// one rounding). In place allowed (y == x).
#[allow(clippy::too_many_arguments)]
pub fn affine(dev: &CudaDevice, dt: DType, x: u64, y: u64, n: usize, a: f32, b: f32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let tag = dtype_tag(dt)?;
    dev.launch(&format!("affine_{tag}"), fill_grid(dev, n), (256, 1, 1), 0, &[Arg::Ptr(x), Arg::Ptr(y), Arg::Ptr(n as u64), Arg::F32(a), Arg::F32(b)])
}

fn dense_check(dt: DType, w: u64, n: usize, k: usize) -> Result<()> {
    let epc = 16 / dt.size_bytes();
    if n == 0 || k == 0 || k % epc != 0 || n >= (1 << 31) || k >= (1 << 31) {
        return Err(inv(format!("dense matvec: N={n}, K={k}: K must be a positive multiple of {epc} for {dt}")));
    }
    aligned(w, 16, "dense weight")
}

#[allow(clippy::too_many_arguments)]
fn mv_dense_launch(dev: &CudaDevice, dt: DType, w: u64, n: usize, k: usize, ids: u64, slots: usize, x: u64, x_stride: usize, y: u64) -> Result<()> {
    dense_check(dt, w, n, k)?;
    let tag = dtype_tag(dt)?;
    dev.launch(
        &format!("mv_dense_{tag}"),
        (n.div_ceil(128) as u32, slots as u32, 1),
        (128, 1, 1),
        0,
        &[Arg::Ptr(w), Arg::Ptr(x), Arg::Ptr(y), Arg::Ptr(ids), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(x_stride as i32)],
    )
}

/// y[N] = W·x for an unquantized W `[N, K]` of `dt` (row-major, 16-byte aligned, K a
/// multiple of 8 for bf16/f16, 4 for f32). Each output accumulates in f32 in k order
/// from 0 (product, then add; no FMA) and is rounded once: bit-identical to MLX's CPU
/// gemm (zmlx-core `ops::matmul_t`).
#[allow(clippy::too_many_arguments)]
pub fn mv_dense(dev: &CudaDevice, dt: DType, w: u64, n: usize, k: usize, x: u64, y: u64) -> Result<()> {
    mv_dense_launch(dev, dt, w, n, k, 0, 1, x, 0, y)
}

/// Unquantized MoE expert matmuls in one launch: for slot i < `kslots`,
/// y[i] = W[ids[i]]·x_i with W stacked `[E, N, K]`, `ids` u32 in device memory (< E),
/// x_i = x (shared) or x[i·K..] (`x_per_slot`); y `[kslots, N]`. Same arithmetic as [`mv_dense`].
#[allow(clippy::too_many_arguments)]
pub fn gather_mv_dense(dev: &CudaDevice, dt: DType, w_stacked: u64, n: usize, k: usize, ids: u64, kslots: usize, x: u64, x_per_slot: bool, y: u64) -> Result<()> {
    if ids == 0 || kslots == 0 {
        return Err(inv("gather_mv_dense needs expert ids and kslots > 0".into()));
    }
    mv_dense_launch(dev, dt, w_stacked, n, k, ids, kslots, x, if x_per_slot { k } else { 0 }, y)
}

/// Row `*id_ptr` (u32 in device memory) of an unquantized table `[vocab, dim]` → out `[dim]`.
pub fn embed_dense(dev: &CudaDevice, dt: DType, table: u64, dim: usize, id_ptr: u64, out: u64) -> Result<()> {
    let tag = dtype_tag(dt)?;
    elementwise(dev, &format!("embed_dense_{tag}"), dim, &[Arg::Ptr(table), Arg::Ptr(id_ptr), Arg::Ptr(out), Arg::I32(dim as i32)])
}

/// Device copy with a vectorized kernel (16-byte accesses); `bytes` multiple of 16.
pub fn copy_kernel(dev: &CudaDevice, src: u64, dst: u64, bytes: usize) -> Result<()> {
    if bytes % 16 != 0 {
        return Err(inv("copy_kernel: bytes must be a multiple of 16".into()));
    }
    aligned(src, 16, "src")?;
    aligned(dst, 16, "dst")?;
    let n16 = (bytes / 16) as u64;
    let blocks = (n16.div_ceil(256) as u32).min(dev.sm_count() * 8);
    dev.launch("copy_u4", (blocks, 1, 1), (256, 1, 1), 0, &[Arg::Ptr(src), Arg::Ptr(dst), Arg::Ptr(n16)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine captures one graph per attention choice: few of them, each valid for the
    /// launcher, and every Split fits the workspace `AttnShape` reserves.
    #[test]
    fn attention_choice_is_valid_and_bounded() {
        let mut seen = std::collections::HashSet::new();
        let shape = AttnShape { n_heads: 32, n_kv_heads: 4, head_dim: 128, max_len: ATT_MAX_LEN };
        let mut last = AttnKernel::Single;
        for len in 1..=ATT_MAX_LEN {
            let k = AttnKernel::for_len(len);
            seen.insert(k);
            if let AttnKernel::Split(s) = k {
                assert!((2..=ATT_SPLIT_KERNEL_MAX as u32).contains(&s), "len {len}: {s} splits");
                assert!(shape.n_heads * s as usize * (shape.head_dim + 2) * 4 <= shape.workspace_bytes());
                // more splits as the length grows, never fewer
                if let AttnKernel::Split(p) = last {
                    assert!(s >= p, "len {len}: splits went down from {p} to {s}");
                }
            }
            last = k;
        }
        assert!(seen.len() <= 5, "{} graphs per decode: {seen:?}", seen.len());
        assert_eq!(AttnKernel::for_len(1), AttnKernel::Single);
        assert_eq!(AttnKernel::for_len(ATT_SPLIT_MAX_LEN + 1), AttnKernel::Long);
        // qk_norm_rope rides along only where blocks per head are few (never the long kernel)
        assert!(AttnKernel::for_len(128).takes_qk_prologue(128) && !AttnKernel::for_len(300).takes_qk_prologue(300));
        assert!(!AttnKernel::for_len(1000).takes_qk_prologue(1000) && !AttnKernel::Long.takes_qk_prologue(1));
        // A small cache still reserves room for the largest split the launcher takes.
        let small = AttnShape { max_len: 40, ..shape };
        assert!(small.n_heads * ATT_SPLIT_KERNEL_MAX * (small.head_dim + 2) * 4 <= small.workspace_bytes());
    }

    #[test]
    fn rms_norm_block_is_a_warp_multiple_holding_eight_values_per_thread() {
        for n in [16usize, 64, 100, 2048, 4096, 4103, 8192, 9000] {
            let t = rms_norm_threads(n) as usize;
            assert!(t % 32 == 0 && (32..=1024).contains(&t));
            assert!(n > 8192 || n <= 8 * t, "n {n}: {t} threads");
        }
    }
}
