//! Qwen3-MoE decode on CUDA: the unfused path. It computes what mlx-lm computes, op by op
//! (router matmul, softmax, top-k, one gathered quantized matmul per projection, SiLU·mul,
//! weighted sum), one token per step, with every buffer preallocated and the step
//! captured once into a CUDA graph that is replayed for each token.

use std::collections::HashMap;
use std::sync::Arc;

use zmlx_core::sampling::SampleParams;
use zmlx_core::DType;
use zmlx_cuda::{fused, mlx_cpu, ops, Arena, AttnKernel, AttnShape, CudaDevice, CudaGraph, DevBuf, Event, HostU32, QuantWeight};

use crate::error::{ModelError, Result};
use crate::generate::{sample_on_host, Decoder};
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::config::Quantization;
use crate::models::qwen3_moe::ModelArgs;
use crate::nn::quantized_tensors;
use crate::patch::{Backend, MoeVariant, PatchReport, Pattern};

fn cuda_err(e: zmlx_cuda::CudaError) -> ModelError {
    ModelError::invalid(format!("CUDA: {e}"))
}


/// A linear layer (or stacked experts) on the device: MLX-quantized or plain float.
#[derive(Clone, Copy, Debug)]
pub enum DevLinear {
    Quant(QuantWeight),
    Dense { w: u64, n: usize, k: usize, n_experts: usize },
}

impl DevLinear {
    pub fn n(&self) -> usize {
        match self {
            DevLinear::Quant(q) => q.n,
            DevLinear::Dense { n, .. } => *n,
        }
    }

    fn quant(&self) -> Option<&QuantWeight> {
        match self {
            DevLinear::Quant(q) => Some(q),
            DevLinear::Dense { .. } => None,
        }
    }

    /// y = W·x (`mc`: MLX's CPU arithmetic, [`CudaQwen3Moe::use_mlx_cpu_numerics`]).
    fn mv(&self, dev: &CudaDevice, dt: DType, mc: bool, x: u64, y: u64) -> zmlx_cuda::Result<()> {
        match self {
            DevLinear::Quant(q) if mc => mlx_cpu::qmm(dev, dt, q, 0, 1, x, false, y),
            DevLinear::Quant(q) => ops::qmv(dev, dt, q, x, y),
            DevLinear::Dense { w, n, k, .. } => ops::mv_dense(dev, dt, *w, *n, *k, x, y),
        }
    }

    /// y[i] = W[ids[i]]·x_i for the k selected experts.
    #[allow(clippy::too_many_arguments)]
    fn gather_mv(&self, dev: &CudaDevice, dt: DType, mc: bool, ids: u64, k: usize, x: u64, x_per_slot: bool, y: u64) -> zmlx_cuda::Result<()> {
        match self {
            DevLinear::Quant(q) if mc => mlx_cpu::qmm(dev, dt, q, ids, k, x, x_per_slot, y),
            DevLinear::Quant(q) => ops::gather_qmv(dev, dt, q, ids, k, x, x_per_slot, y),
            DevLinear::Dense { w, n, k: cols, .. } => ops::gather_mv_dense(dev, dt, *w, *n, *cols, ids, k, x, x_per_slot, y),
        }
    }

    /// Row `*id_ptr` of an embedding table.
    fn embed(&self, dev: &CudaDevice, dt: DType, id_ptr: u64, out: u64) -> zmlx_cuda::Result<()> {
        match self {
            DevLinear::Quant(q) => ops::embed(dev, dt, q, id_ptr, out),
            DevLinear::Dense { w, k, .. } => ops::embed_dense(dev, dt, *w, *k, id_ptr, out),
        }
    }
}

/// Where the engine's weights come from: a checkpoint on disk, or random values drawn on
/// the device in the checkpoint's format (`--dummy-weights`).
pub trait WeightSource {
    /// A linear, or experts stacked `[E, N, K]`: `rows_shape` is `[N]` or `[E, N]`.
    fn linear(&mut self, module: &str, rows_shape: &[usize], cols: usize) -> Result<DevLinear>;
    /// A float vector (norm weight) in the compute dtype.
    fn vector(&mut self, module: &str, len: usize) -> Result<u64>;
    /// The buffers made so far.
    fn store(&self) -> &Store;
    fn into_store(self: Box<Self>) -> Store;
    fn dtype(&self) -> DType {
        self.store().dtype
    }
}

/// The device buffers a weight source made (the engine keeps them alive).
pub struct Store {
    pub dtype: DType,
    pub bufs: Vec<DevBuf>,
    pub bytes: usize,
}

impl Store {
    fn new(dtype: DType) -> Self {
        Store { dtype, bufs: Vec::new(), bytes: 0 }
    }

    fn keep(&mut self, b: DevBuf) -> u64 {
        let p = b.ptr();
        self.bytes += b.bytes();
        self.bufs.push(b);
        p
    }
}

/// Uploads tensors straight from the memory-mapped safetensors.
pub struct CheckpointSource<'a> {
    dev: &'a CudaDevice,
    ckpt: &'a Checkpoint,
    quant: &'a Quantization,
    store: Store,
}

impl<'a> CheckpointSource<'a> {
    pub fn new(dev: &'a CudaDevice, ckpt: &'a Checkpoint, quant: &'a Quantization, dtype: DType) -> Self {
        CheckpointSource { dev, ckpt, quant, store: Store::new(dtype) }
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        Ok(self.store.keep(self.dev.upload(bytes).map_err(cuda_err)?))
    }

    /// A float tensor in the compute dtype (converted if the checkpoint stores another).
    fn floats(&mut self, t: &TensorRef) -> Result<u64> {
        let dtype = self.store.dtype;
        if t.dtype == dtype {
            return self.upload(t.bytes);
        }
        let bytes = zmlx_core::dtype::floats_to_le_bytes(dtype, &t.to_f32()?.iter().map(|&x| dtype.round(x)).collect::<Vec<_>>());
        self.upload(&bytes)
    }
}

impl WeightSource for CheckpointSource<'_> {
    fn linear(&mut self, module: &str, rows_shape: &[usize], cols: usize) -> Result<DevLinear> {
        let Some(t) = quantized_tensors(self.ckpt, self.quant, module, rows_shape, cols)? else {
            let w = self.ckpt.get(&format!("{module}.weight"))?;
            w.expect_shape(&[rows_shape, &[cols]].concat())?;
            return Ok(DevLinear::Dense {
                w: self.floats(&w)?,
                n: *rows_shape.last().unwrap(),
                k: cols,
                n_experts: rows_shape[..rows_shape.len() - 1].iter().product(),
            });
        };
        let w = self.upload(t.weight.bytes)?;
        Ok(DevLinear::Quant(QuantWeight {
            w,
            scales: self.floats(&t.scales)?,
            biases: self.floats(&t.biases)?,
            n: *rows_shape.last().unwrap(),
            k: cols,
            bits: t.spec.bits,
            group_size: t.spec.group_size as u32,
            n_experts: rows_shape[..rows_shape.len() - 1].iter().product(),
        }))
    }

    fn vector(&mut self, module: &str, len: usize) -> Result<u64> {
        let t = self.ckpt.get(&format!("{module}.weight"))?;
        t.expect_shape(&[len])?;
        self.floats(&t)
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn into_store(self: Box<Self>) -> Store {
        self.store
    }
}

/// Random weights drawn on the device, in the format a real mlx-lm conversion has
/// (same shapes, bits, groups, dtypes), scaled so activations stay O(1).
pub struct DummySource<'a> {
    dev: &'a CudaDevice,
    quant: Quantization,
    seed: u64,
    store: Store,
}

impl<'a> DummySource<'a> {
    pub fn new(dev: &'a CudaDevice, quant: Quantization, dtype: DType, seed: u64) -> Self {
        DummySource { dev, quant, seed, store: Store::new(dtype) }
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        Ok(self.store.keep(self.dev.alloc(bytes).map_err(cuda_err)?))
    }

    fn next_seed(&mut self) -> u64 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.seed
    }
}

impl WeightSource for DummySource<'_> {
    fn linear(&mut self, module: &str, rows_shape: &[usize], cols: usize) -> Result<DevLinear> {
        let spec = self
            .quant
            .spec_for(module)
            .ok_or_else(|| ModelError::invalid(format!("`{module}` would stay unquantized; the CUDA backend needs quantized linears")))?;
        if cols % spec.group_size != 0 {
            return Err(ModelError::invalid(format!("`{module}`: input dims {cols} not a multiple of group size {}", spec.group_size)));
        }
        let rows: usize = rows_shape.iter().product();
        let words = rows * spec.packed_cols(cols);
        let groups = rows * cols / spec.group_size;
        let dtype = self.store.dtype;
        let es = dtype.size_bytes();
        let (w, scales, biases) = (self.alloc(words * 4)?, self.alloc(groups * es)?, self.alloc(groups * es)?);
        // Uniform codes q in [0, 2^bits); w = s*q + b with b = -s*(2^bits-1)/2 is zero-mean with
        // std ≈ s*2^bits/sqrt(12); pick s so that std ≈ 1/sqrt(cols) (unit-variance outputs).
        let levels = (1u64 << spec.bits) as f32;
        let s0 = (12.0f32).sqrt() / levels / (cols as f32).sqrt();
        let (seed_w, seed_s) = (self.next_seed(), self.next_seed());
        let dev = self.dev;
        ops::fill_random_u32(dev, w, words, seed_w).map_err(cuda_err)?;
        ops::fill_random_uniform(dev, dtype, scales, groups, seed_s, 0.5 * s0, 1.5 * s0).map_err(cuda_err)?;
        ops::affine(dev, dtype, scales, biases, groups, -(levels - 1.0) / 2.0, 0.0).map_err(cuda_err)?;
        Ok(DevLinear::Quant(QuantWeight {
            w,
            scales,
            biases,
            n: *rows_shape.last().unwrap(),
            k: cols,
            bits: spec.bits,
            group_size: spec.group_size as u32,
            n_experts: rows_shape[..rows_shape.len() - 1].iter().product(),
        }))
    }

    fn vector(&mut self, _module: &str, len: usize) -> Result<u64> {
        let dtype = self.store.dtype;
        let p = self.alloc(len * dtype.size_bytes())?;
        let seed = self.next_seed();
        ops::fill_random_uniform(self.dev, dtype, p, len, seed, 0.8, 1.2).map_err(cuda_err)?;
        Ok(p)
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn into_store(self: Box<Self>) -> Store {
        self.store
    }
}

struct DevMlp {
    gate: DevLinear,
    up: DevLinear,
    down: DevLinear,
}

impl DevMlp {
    fn all_quantized(&self) -> bool {
        self.gate.quant().is_some() && self.up.quant().is_some() && self.down.quant().is_some()
    }
}

enum DevFeedForward {
    Sparse { router: DevLinear, experts: DevMlp, top_k: usize, renorm: bool },
    Dense(DevMlp),
}

struct DevLayer {
    /// Fused variants chosen by `patch`.
    moe: MoeVariant,
    fused_swiglu_mlp: bool,
    fused_add_norm: bool,
    fused_qkv: bool,
    fused_o_add: bool,
    fused_norm_router: bool,
    fused_qk_rope: bool,
    q: DevLinear,
    k: DevLinear,
    v: DevLinear,
    o: DevLinear,
    q_norm: u64,
    k_norm: u64,
    in_norm: u64,
    post_norm: u64,
    ff: DevFeedForward,
    k_cache: u64,
    v_cache: u64,
}

impl DevLayer {
    /// The post-attention RMSNorm runs inside the router kernel (norm_router).
    fn norm_in_router(&self) -> bool {
        matches!(self.ff, DevFeedForward::Sparse { .. }) && self.fused_norm_router
    }
}

/// Activations and scratch of one step, all carved from one arena at load (one set per
/// concurrent prompt step too, [`CudaQwen3Moe::prefill_lanes`]).
#[derive(Clone)]
struct Scratch {
    /// A u32 0: the expert id of a dense MLP run through the gathered kernels.
    zero_id: u64,
    /// logprobs_argmax workspace (zeroed once; the kernel leaves it zeroed).
    argmax_ws: u64,
    /// moe_gating's workspace (its last-block counter is reset by the kernel).
    gating_ws: u64,
    /// moe_experts' grid barrier (zeroed once; the kernel leaves it ready).
    experts_ws: u64,
    /// The sampler's workspace (zeroed once; the kernels leave their state zeroed) and seed (u64).
    sample_ws: u64,
    seed: u64,
    token: u64,
    pos: u64,
    x: u64,
    xn: u64,
    q: u64,
    k: u64,
    v: u64,
    attn: u64,
    o: u64,
    router: u64,
    ids: u64,
    weights: u64,
    g: u64,
    u: u64,
    act: u64,
    y: u64,
    ff_out: u64,
    logits: u64,
    att_ws: u64,
}

impl Scratch {
    /// Bytes of each buffer, in carving order; the last five (logits, the argmax and sampler
    /// workspaces, the seed) only where the step has a head.
    fn sizes(a: &ModelArgs, dtype: DType, attn: &AttnShape) -> [usize; 25] {
        let es = dtype.size_bytes();
        let (d, hd) = (a.hidden_size, a.head_dim());
        let k = a.num_experts_per_tok.max(1);
        let inter = a.moe_intermediate_size.max(a.intermediate_size);
        let (qd, kvd) = (a.num_attention_heads * hd, a.num_key_value_heads * hd);
        let n_layers = a.num_hidden_layers;
        [
            4, // zero_id
            fused::moe_gating_workspace_bytes(a.num_experts.max(1)),
            fused::MOE_EXPERTS_WORKSPACE_BYTES,
            4, // token
            4, // pos
            d * es,
            d * es,
            qd * es,
            kvd * es,
            kvd * es,
            qd * es,
            d * es,
            a.num_experts.max(1) * es,
            n_layers * k * 4,
            n_layers * k * 4,
            k * inter * es,
            k * inter * es,
            k * inter * es,
            k * d * es,
            d * es,
            attn.workspace_bytes(),
            a.vocab_size * es, // logits
            ops::LOGPROBS_ARGMAX_WORKSPACE_BYTES,
            ops::sample_workspace_bytes(a.vocab_size),
            8, // seed
        ]
    }

    fn bytes(a: &ModelArgs, dtype: DType, attn: &AttnShape, head: bool) -> usize {
        let sizes = Self::sizes(a, dtype, attn);
        sizes[..if head { 25 } else { 21 }].iter().map(|s| s.div_ceil(256) * 256 + 256).sum()
    }

    /// Carve a set from `arena` and zero the workspaces the kernels expect zeroed. Without a
    /// head of its own (`head`: the main set), the set shares that set's head buffers: a
    /// prompt step before the last never computes logits.
    fn carve(dev: &CudaDevice, arena: &mut Arena, a: &ModelArgs, dtype: DType, attn: &AttnShape, head: Option<&Scratch>) -> Result<Scratch> {
        let sizes = Self::sizes(a, dtype, attn);
        let mut i = 0;
        let mut next = || -> Result<u64> {
            i += 1;
            arena.alloc(sizes[i - 1]).map_err(cuda_err)
        };
        let mut s = Scratch {
            zero_id: next()?,
            gating_ws: next()?,
            experts_ws: next()?,
            token: next()?,
            pos: next()?,
            x: next()?,
            xn: next()?,
            q: next()?,
            k: next()?,
            v: next()?,
            attn: next()?,
            o: next()?,
            router: next()?,
            ids: next()?,
            weights: next()?,
            g: next()?,
            u: next()?,
            act: next()?,
            y: next()?,
            ff_out: next()?,
            att_ws: next()?,
            logits: 0,
            argmax_ws: 0,
            sample_ws: 0,
            seed: 0,
        };
        match head {
            Some(h) => (s.logits, s.argmax_ws, s.sample_ws, s.seed) = (h.logits, h.argmax_ws, h.sample_ws, h.seed),
            None => {
                (s.logits, s.argmax_ws, s.sample_ws, s.seed) = (next()?, next()?, next()?, next()?);
                dev.memset(s.argmax_ws, 0, sizes[22]).map_err(cuda_err)?;
                dev.memset(s.sample_ws, 0, sizes[23]).map_err(cuda_err)?;
            }
        }
        dev.memset(s.zero_id, 0, sizes[0]).map_err(cuda_err)?;
        dev.memset(s.gating_ws, 0, sizes[1]).map_err(cuda_err)?;
        dev.memset(s.experts_ws, 0, sizes[2]).map_err(cuda_err)?;
        Ok(s)
    }
}

/// Prompt steps run at once by default (`ZMLX_PREFILL_LANES`), and whether `--temp` samples on
/// the device by default (`ZMLX_DEVICE_SAMPLING`). Both verified on the H100 (2026-12-06): the
/// `sample` self-test rows (token and every intermediate equal to the host's), 128/128 sampled
/// tokens equal to the host sampler's, and `zmlx validate`'s prefill check (bit-identical logits,
/// 600-token prompt 787 vs 450 tok/s); docs/kernels.md, docs/benchmarks.md.
const DEFAULT_PREFILL_LANES: usize = 16;
const DEVICE_SAMPLING_DEFAULT: bool = true;
/// Whether `--min-p` samples on the device too (`ZMLX_DEVICE_MIN_P`). The kernels take it, but
/// they have not run on a GPU yet (written 2026-12-06 after the session's device time was
/// spent): until the `sample` self-test rows with min-p pass there, min-p samples on the host.
const DEVICE_MIN_P_DEFAULT: bool = false;

/// The attention kernel for a step over `len` positions, and whether it takes the q/k
/// prologue: what a step's graph depends on besides its head.
fn attn_variant(len: usize) -> (AttnKernel, bool) {
    let k = AttnKernel::for_len(len);
    (k, k.takes_qk_prologue(len))
}

/// What a step computes after the last layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Head {
    /// Nothing: a prompt token before the last, whose logits nobody reads.
    Hidden,
    /// Logits and the greedy token.
    Greedy,
    /// Logits and a token sampled on the device (`ops::sample`; the seed is in device memory).
    Sample(SampleKey),
}

/// Sampling parameters as a graph key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SampleKey {
    temp_bits: u32,
    top_p_bits: u32,
    top_k: usize,
    min_p_bits: u32,
}

impl SampleKey {
    fn new(p: &SampleParams) -> Self {
        SampleKey { temp_bits: p.temp.to_bits(), top_p_bits: p.top_p.to_bits(), top_k: p.top_k, min_p_bits: p.min_p.to_bits() }
    }
    fn params(&self) -> SampleParams {
        SampleParams { temp: f32::from_bits(self.temp_bits), top_p: f32::from_bits(self.top_p_bits), top_k: self.top_k, min_p: f32::from_bits(self.min_p_bits) }
    }
}

pub struct CudaQwen3Moe {
    dev: Arc<CudaDevice>,
    dtype: DType,
    eps: f32,
    hidden: usize,
    vocab: usize,
    rope_base: f32,
    head_dim: usize,
    attn: AttnShape,
    scale: f32,
    top_k: usize,
    embed: DevLinear,
    lm_head: DevLinear,
    final_norm: u64,
    layers: Vec<DevLayer>,
    s: Scratch,
    _buffers: Vec<DevBuf>,
    _arena: Arena,
    /// Captured steps by (attention kernel, q/k prologue, head), with their launch counts.
    graphs: HashMap<(AttnKernel, bool, Head), (CudaGraph, usize)>,
    /// Captured concurrent prompt steps by (attention kernel, q/k prologue, tokens).
    prefill_graphs: HashMap<(AttnKernel, bool, usize), CudaGraph>,
    /// Scratch sets of the concurrent prompt steps (lanes 1..), each in its own arena.
    lane_scratch: Vec<(Scratch, Arena)>,
    prefill_lanes_max: usize,
    /// Sample on the device (`ZMLX_DEVICE_SAMPLING=1`; 0: on the host from the logits).
    device_sampling: bool,
    /// Min-p on the device too (`DEVICE_MIN_P_DEFAULT`).
    device_min_p: bool,
    args: ModelArgs,
    /// Launches of the last step (`launches_per_token`).
    last_launches: Option<usize>,
    use_graph: bool,
    /// MLX's CPU numerics: the attention scores' workspace while on (`use_mlx_cpu_numerics`).
    mlx_cpu: Option<DevBuf>,
    /// Tokens in the KV cache (a look-ahead step included).
    len: usize,
    /// Greedy look-ahead ([`Decoder::set_lookahead`]; `ZMLX_LOOKAHEAD=0` never allows it).
    lookahead: bool,
    lookahead_allowed: bool,
    /// A look-ahead step is enqueued with this head: it consumes `last_token`, which the
    /// device produced.
    ahead: Option<Head>,
    /// The sampling seed on the device.
    seed_on_device: Option<u64>,
    last_token: Option<u32>,
    /// Where each step's greedy token is copied without blocking.
    token_slot: HostU32,
    pub weight_bytes: usize,
    /// Everything this engine allocated on the device (weights, KV caches, arena).
    pub device_bytes: usize,
}

impl CudaQwen3Moe {
    /// Build the engine from `config.json`'s arguments and a weight source; `max_len` is the
    /// KV-cache capacity in tokens.
    pub fn new(dev: Arc<CudaDevice>, args: &ModelArgs, mut src: Box<dyn WeightSource + '_>, max_len: usize, use_graph: bool) -> Result<Self> {
        let a = args;
        let dtype = src.dtype();
        let (d, hd) = (a.hidden_size, a.head_dim());
        let embed = src.linear("model.embed_tokens", &[a.vocab_size], d)?;
        let lm_head = if a.tie_word_embeddings { embed } else { src.linear("lm_head", &[a.vocab_size], d)? };
        let max_len = max_len.clamp(1, a.max_position_embeddings);
        let attn = AttnShape { n_heads: a.num_attention_heads, n_kv_heads: a.num_key_value_heads, head_dim: hd, max_len };
        let cache_bytes = a.num_key_value_heads * max_len * hd * dtype.size_bytes();
        let mut layers = Vec::new();
        let mut caches = Vec::new();
        for i in 0..a.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mlp = |src: &mut Box<dyn WeightSource + '_>, m: &str, rows: &[usize], inter: usize| -> Result<DevMlp> {
                let with = |n: usize| [&rows[..], &[n]].concat();
                Ok(DevMlp {
                    gate: src.linear(&format!("{m}.gate_proj"), &with(inter), d)?,
                    up: src.linear(&format!("{m}.up_proj"), &with(inter), d)?,
                    down: src.linear(&format!("{m}.down_proj"), &with(d), inter)?,
                })
            };
            let ff = if a.is_sparse_layer(i) {
                DevFeedForward::Sparse {
                    router: src.linear(&format!("{p}.mlp.gate"), &[a.num_experts], d)?,
                    experts: mlp(&mut src, &format!("{p}.mlp.switch_mlp"), &[a.num_experts], a.moe_intermediate_size)?,
                    top_k: a.num_experts_per_tok,
                    renorm: a.norm_topk_prob,
                }
            } else {
                DevFeedForward::Dense(mlp(&mut src, &format!("{p}.mlp"), &[], a.intermediate_size)?)
            };
            let sa = format!("{p}.self_attn");
            let k_cache = dev.alloc(cache_bytes).map_err(cuda_err)?;
            let v_cache = dev.alloc(cache_bytes).map_err(cuda_err)?;
            layers.push(DevLayer {
                moe: MoeVariant::default(),
                fused_swiglu_mlp: false,
                fused_add_norm: false,
                fused_qkv: false,
                fused_o_add: false,
                fused_norm_router: false,
                fused_qk_rope: false,
                q: src.linear(&format!("{sa}.q_proj"), &[a.num_attention_heads * hd], d)?,
                k: src.linear(&format!("{sa}.k_proj"), &[a.num_key_value_heads * hd], d)?,
                v: src.linear(&format!("{sa}.v_proj"), &[a.num_key_value_heads * hd], d)?,
                o: src.linear(&format!("{sa}.o_proj"), &[d], a.num_attention_heads * hd)?,
                q_norm: src.vector(&format!("{sa}.q_norm"), hd)?,
                k_norm: src.vector(&format!("{sa}.k_norm"), hd)?,
                in_norm: src.vector(&format!("{p}.input_layernorm"), d)?,
                post_norm: src.vector(&format!("{p}.post_attention_layernorm"), d)?,
                ff,
                k_cache: k_cache.ptr(),
                v_cache: v_cache.ptr(),
            });
            caches.push(k_cache);
            caches.push(v_cache);
        }
        let final_norm = src.vector("model.norm", d)?;
        let store = src.into_store();
        let weight_bytes = store.bytes;
        let mut bufs = store.bufs;
        bufs.extend(caches);

        let mut arena = dev.arena(Scratch::bytes(a, dtype, &attn, true)).map_err(cuda_err)?;
        let s = Scratch::carve(&dev, &mut arena, a, dtype, &attn, None)?;
        let device_bytes = weight_bytes + 2 * cache_bytes * a.num_hidden_layers + arena.capacity();
        Ok(CudaQwen3Moe {
            dev: dev.clone(),
            dtype,
            eps: a.rms_norm_eps,
            hidden: d,
            vocab: a.vocab_size,
            rope_base: a.rope_theta,
            head_dim: hd,
            attn,
            scale: (hd as f32).powf(-0.5),
            top_k: a.num_experts_per_tok.max(1),
            embed,
            lm_head,
            final_norm,
            layers,
            s,
            _buffers: bufs,
            _arena: arena,
            graphs: HashMap::new(),
            prefill_graphs: HashMap::new(),
            lane_scratch: Vec::new(),
            prefill_lanes_max: std::env::var("ZMLX_PREFILL_LANES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PREFILL_LANES).max(1),
            device_sampling: std::env::var("ZMLX_DEVICE_SAMPLING").map_or(DEVICE_SAMPLING_DEFAULT, |v| v != "0"),
            device_min_p: std::env::var("ZMLX_DEVICE_MIN_P").map_or(DEVICE_MIN_P_DEFAULT, |v| v != "0"),
            args: a.clone(),
            last_launches: None,
            use_graph,
            mlx_cpu: None,
            len: 0,
            lookahead: false,
            lookahead_allowed: std::env::var("ZMLX_LOOKAHEAD").map_or(true, |v| v != "0"),
            ahead: None,
            seed_on_device: None,
            last_token: None,
            token_slot: dev.host_u32().map_err(cuda_err)?,
            weight_bytes,
            device_bytes,
        })
    }

    /// Enqueue one step: token at `s.token`, position at `s.pos`. With a head (every step but
    /// the prompt's non-final tokens, whose logits nobody reads) it leaves logits in `s.logits`
    /// and the next token in `s.token`. Each block runs the variant `patch` chose.
    /// `kv_order(layer, before)` runs on the step's lane just before the layer's first
    /// kernel that touches the KV cache (q/k norm, rope, append, attention) and just after
    /// its attention: concurrent prompt steps order their KV rows there (`enqueue_prefill`).
    fn enqueue_step(&self, dev: &CudaDevice, s: &Scratch, attn_kernel: AttnKernel, qk_prologue: bool, head: Head, kv_order: &mut dyn FnMut(usize, bool) -> zmlx_cuda::Result<()>) -> zmlx_cuda::Result<()> {
        let (dt, d, hd, eps) = (self.dtype, self.hidden, self.head_dim, self.eps);
        let (hq, hkv) = (self.attn.n_heads, self.attn.n_kv_heads);
        let mc = self.mlx_cpu.is_some();
        let rms_norm = |x: u64, w: u64, y: u64, rows: usize, n: usize| {
            if mc {
                mlx_cpu::rms_norm(dev, dt, x, w, y, rows, n, eps)
            } else {
                ops::rms_norm(dev, dt, x, w, y, rows, n, eps)
            }
        };
        self.embed.embed(dev, dt, s.token, s.x)?;
        rms_norm(s.x, self.layers[0].in_norm, s.xn, 1, d)?;
        for (i, l) in self.layers.iter().enumerate() {
            match (l.fused_qkv, l.q.quant(), l.k.quant(), l.v.quant()) {
                (true, Some(q), Some(k), Some(v)) => fused::qkv(dev, dt, q, k, v, s.xn, s.q, s.k, s.v)?,
                _ => {
                    l.q.mv(dev, dt, mc, s.xn, s.q)?;
                    l.k.mv(dev, dt, mc, s.xn, s.k)?;
                    l.v.mv(dev, dt, mc, s.xn, s.v)?;
                }
            }
            // qk_norm_rope: the attention kernel's prologue where that pays (short lengths with
            // the single-launch kernel: AttnKernel::takes_qk_prologue), else its own launch.
            kv_order(i, true)?;
            if l.fused_qk_rope && qk_prologue {
                let pro = ops::QkNormRope { k: s.k, v: s.v, q_norm_w: l.q_norm, k_norm_w: l.k_norm, eps, rope_base: self.rope_base };
                ops::attention_decode_qk_norm_rope(dev, dt, &self.attn, attn_kernel, s.q, l.k_cache, l.v_cache, s.pos, 1, self.scale, s.att_ws, s.attn, &pro)?;
            } else {
                if l.fused_qk_rope {
                    ops::qk_norm_rope_append(dev, dt, s.q, s.k, s.v, l.q_norm, l.k_norm, l.k_cache, l.v_cache, s.pos, &self.attn, eps, self.rope_base)?;
                } else {
                    rms_norm(s.q, l.q_norm, s.q, hq, hd)?;
                    rms_norm(s.k, l.k_norm, s.k, hkv, hd)?;
                    ops::rope(dev, dt, s.q, s.q, s.pos, 0, hq, hd, hd, self.rope_base, 1.0)?;
                    ops::rope(dev, dt, s.k, s.k, s.pos, 0, hkv, hd, hd, self.rope_base, 1.0)?;
                    ops::kv_append(dev, dt, &self.attn, s.k, s.v, l.k_cache, l.v_cache, s.pos, 0)?;
                }
                match &self.mlx_cpu {
                    Some(ws) => mlx_cpu::attention(dev, dt, &self.attn, s.q, l.k_cache, l.v_cache, s.pos, 1, self.scale, ws.ptr(), s.attn)?,
                    None => ops::attention_decode(dev, dt, &self.attn, attn_kernel, s.q, l.k_cache, l.v_cache, s.pos, 1, self.scale, s.att_ws, s.attn)?,
                }
            }
            kv_order(i, false)?;
            // h = x + attn; xn = post_attention_layernorm(h) (inside norm_router when fused).
            let mut normed = l.norm_in_router();
            match (l.fused_o_add, l.o.quant()) {
                (true, Some(o)) => ops::qmv_add(dev, dt, o, s.attn, s.x, s.x)?,
                _ => {
                    l.o.mv(dev, dt, mc, s.attn, s.o)?;
                    if l.fused_add_norm && !normed {
                        fused::add_rms_norm(dev, dt, s.x, s.o, l.post_norm, s.x, s.xn, d, eps)?;
                        normed = true;
                    } else {
                        ops::add(dev, dt, s.x, s.o, s.x, d)?;
                    }
                }
            }
            if !normed {
                rms_norm(s.x, l.post_norm, s.xn, 1, d)?;
            }
            // The feed-forward block leaves its output in ff_out, or adds it into x itself.
            let mut added = false;
            match &l.ff {
                DevFeedForward::Sparse { router, experts, top_k, renorm } => {
                    let k = *top_k;
                    let (ids, weights) = (s.ids + (i * k * 4) as u64, s.weights + (i * k * 4) as u64);
                    // `patch` sets a fused variant only where every weight it reads is quantized.
                    let routing = fused::Routing { logits: s.router, n_experts: router.n(), renorm: *renorm };
                    match (l.moe.fused_gating, l.fused_norm_router, router.quant()) {
                        // moe_topk_experts: the expert kernels route themselves from the logits.
                        _ if l.moe.routed => router.mv(dev, dt, mc, s.xn, s.router)?,
                        (true, _, Some(r)) => fused::moe_gating(dev, dt, r, s.xn, 0, eps, 0, k, true, *renorm, ids, weights, s.gating_ws)?,
                        (false, true, Some(r)) => {
                            fused::norm_router(dev, dt, r, s.x, l.post_norm, eps, s.xn, s.router)?;
                            ops::softmax_topk(dev, dt, s.router, 1, router.n(), k, true, *renorm, ids, weights)?;
                        }
                        _ if mc => {
                            router.mv(dev, dt, mc, s.xn, s.router)?;
                            mlx_cpu::softmax_topk(dev, dt, s.router, router.n(), k, *renorm, ids, weights)?;
                        }
                        _ => {
                            router.mv(dev, dt, mc, s.xn, s.router)?;
                            ops::softmax_topk(dev, dt, s.router, 1, router.n(), k, true, *renorm, ids, weights)?;
                        }
                    }
                    if let (true, Some(g), Some(u), Some(dn)) = (l.moe.one_launch, experts.gate.quant(), experts.up.quant(), experts.down.quant()) {
                        fused::moe_experts(dev, dt, g, u, dn, ids, weights, k, s.xn, s.act, s.x, s.x, s.experts_ws)?;
                        added = true;
                    } else {
                        match (l.moe.fused_swiglu, experts.gate.quant(), experts.up.quant()) {
                            (true, Some(g), Some(u)) if l.moe.routed => fused::gather_qmm_swiglu_routed(dev, dt, g, u, routing, k, s.xn, s.act)?,
                            (true, Some(g), Some(u)) => fused::gather_qmm_swiglu(dev, dt, g, u, ids, k, s.xn, s.act)?,
                            _ => {
                                experts.gate.gather_mv(dev, dt, mc, ids, k, s.xn, false, s.g)?;
                                experts.up.gather_mv(dev, dt, mc, ids, k, s.xn, false, s.u)?;
                                ops::swiglu(dev, dt, s.g, s.u, s.act, k * experts.gate.n())?;
                            }
                        }
                        match (l.moe.fused_combine, experts.down.quant()) {
                            (true, Some(dn)) => {
                                if l.moe.routed {
                                    fused::gather_qmm_combine_routed(dev, dt, dn, routing, ids, weights, k, s.act, s.x, s.x)?;
                                } else {
                                    fused::gather_qmm_combine(dev, dt, dn, ids, weights, k, s.act, s.x, s.x)?;
                                }
                                added = true;
                            }
                            _ => {
                                experts.down.gather_mv(dev, dt, mc, ids, k, s.act, true, s.y)?;
                                ops::moe_combine(dev, dt, s.y, weights, s.ff_out, k, d)?;
                            }
                        }
                    }
                }
                DevFeedForward::Dense(m) => {
                    match (l.fused_swiglu_mlp, m.gate.quant(), m.up.quant()) {
                        (true, Some(g), Some(u)) => fused::gather_qmm_swiglu(dev, dt, g, u, s.zero_id, 1, s.xn, s.act)?,
                        _ => {
                            m.gate.mv(dev, dt, mc, s.xn, s.g)?;
                            m.up.mv(dev, dt, mc, s.xn, s.u)?;
                            ops::swiglu(dev, dt, s.g, s.u, s.act, m.gate.n())?;
                        }
                    }
                    m.down.mv(dev, dt, mc, s.act, s.ff_out)?;
                }
            }
            // x += ff; xn = next layer's input_layernorm(x) (or the final norm).
            let next_norm = self.layers.get(i + 1).map_or(self.final_norm, |n| n.in_norm);
            if added {
                rms_norm(s.x, next_norm, s.xn, 1, d)?;
            } else if l.fused_add_norm {
                fused::add_rms_norm(dev, dt, s.x, s.ff_out, next_norm, s.x, s.xn, d, eps)?;
            } else {
                ops::add(dev, dt, s.x, s.ff_out, s.x, d)?;
                rms_norm(s.x, next_norm, s.xn, 1, d)?;
            }
        }
        if head == Head::Hidden {
            return Ok(());
        }
        self.lm_head.mv(dev, dt, mc, s.xn, s.logits)?;
        if mc {
            return mlx_cpu::logprobs_argmax(dev, dt, s.logits, self.vocab, s.token);
        }
        ops::logprobs_argmax(dev, dt, s.logits, self.vocab, s.argmax_ws, s.token)?;
        if let Head::Sample(p) = head {
            ops::sample(dev, dt, s.logits, self.vocab, s.argmax_ws, s.sample_ws, &p.params(), s.seed, s.pos, s.token)?;
        }
        Ok(())
    }

    /// From now on compute as MLX's CPU backend does (kernels/mlx_cpu.cu: quantized matmuls
    /// accumulated in the dtype, serial norms, attention and log-sum-exp, argpartition's
    /// expert order), so the logits equal the CPU reference's bit for bit. Unpatched only:
    /// the fused kernels keep the GPU's f32 arithmetic. Slow (serial kernels); for checking.
    pub fn use_mlx_cpu_numerics(&mut self) -> Result<()> {
        if self.mlx_cpu.is_none() {
            self.mlx_cpu = Some(self.dev.alloc(mlx_cpu::attention_workspace_bytes(&self.attn)).map_err(cuda_err)?);
        }
        self.patch(&[]);
        Ok(())
    }

    /// Switch layers to the fused variants of `patterns`; the graph is re-captured.
    pub fn patch(&mut self, patterns: &[Pattern]) -> PatchReport {
        let mut report = PatchReport::default();
        let patterns = if self.mlx_cpu.is_some() {
            for &p in patterns {
                report.skip(p, "--numerics mlx-cpu: the fused kernels sum in the GPU's order, not MLX's CPU's".into());
            }
            &[][..]
        } else {
            patterns
        };
        let on = |p: Pattern| patterns.contains(&p);
        for l in &mut self.layers {
            // Safety rule: the fused kernels read MLX-quantized weights only.
            match &l.ff {
                DevFeedForward::Sparse { router, experts, top_k, .. } => {
                    // moe_gating and norm_router read a quantized router over a hidden size they take.
                    let router_ok = router.quant().is_some_and(|r| r.k <= fused::MOE_GATING_MAX_K);
                    let gating = on(Pattern::MoeGating) && router_ok;
                    if on(Pattern::MoeGating) && !gating {
                        report.skip(Pattern::MoeGating, format!("router not quantized or hidden size > {}", fused::MOE_GATING_MAX_K));
                    }
                    // Both compute the router; moe_gating (router + top-k) takes precedence.
                    l.fused_norm_router = !gating && on(Pattern::NormRouter) && router_ok;
                    if l.fused_norm_router {
                        report.add("norm_router");
                    }
                    let q = experts.all_quantized();
                    if !q && (on(Pattern::GatherQmmSwiglu) || on(Pattern::GatherQmmCombine)) {
                        report.skip(Pattern::MoeMlp, "a layer with unquantized experts".into());
                    }
                    let mut one_launch = false;
                    if on(Pattern::MoeExperts) {
                        match (experts.gate.quant(), experts.up.quant(), experts.down.quant()) {
                            (Some(g), Some(u), Some(dn)) => match fused::moe_experts_unsupported(&self.dev, self.dtype, g, u, dn, *top_k) {
                                None => one_launch = true,
                                Some(why) => report.skip(Pattern::MoeExperts, why),
                            },
                            _ => report.skip(Pattern::MoeExperts, "a layer with unquantized experts".into()),
                        }
                    }
                    let (fused_swiglu, fused_combine) = (q && on(Pattern::GatherQmmSwiglu), q && on(Pattern::GatherQmmCombine));
                    // moe_topk_experts needs both expert kernels fused (each routes itself) and
                    // takes the place of moe_gating / the one-launch experts (which read ids).
                    let mut routed = false;
                    if on(Pattern::MoeTopkExperts) {
                        let why = if !(fused_swiglu && fused_combine) {
                            Some("needs gather_qmm_swiglu and gather_qmm_combine".to_string())
                        } else if gating || one_launch {
                            Some("moe_gating / moe_experts route this block instead".to_string())
                        } else {
                            fused::routing_unsupported(router.n(), *top_k)
                        };
                        match why {
                            None => routed = true,
                            Some(why) => report.skip(Pattern::MoeTopkExperts, why),
                        }
                    }
                    l.moe = MoeVariant { fused_gating: gating, fused_swiglu, fused_combine, one_launch, routed };
                    l.moe.report(&mut report);
                }
                DevFeedForward::Dense(m) => {
                    l.fused_swiglu_mlp = on(Pattern::SwigluMlp) && m.all_quantized();
                    if l.fused_swiglu_mlp {
                        report.add("swiglu_mlp");
                    }
                }
            }
            l.fused_add_norm = on(Pattern::AddRmsNorm);
            if l.fused_add_norm {
                report.add("add_rms_norm");
            }
            l.fused_o_add = on(Pattern::OProjAdd) && l.o.quant().is_some();
            if l.fused_o_add {
                report.add("o_proj_add");
            }
            l.fused_qkv = on(Pattern::QkvProj) && l.q.quant().is_some() && l.k.quant().is_some() && l.v.quant().is_some();
            if l.fused_qkv {
                report.add("qkv_proj");
            }
            l.fused_qk_rope = on(Pattern::QkNormRope);
            if l.fused_qk_rope {
                report.add("qk_norm_rope");
            }
        }
        // A look-ahead step may still run one of the graphs dropped here.
        self.dev.sync().ok();
        self.graphs.clear();
        self.prefill_graphs.clear();
        self.len = 0;
        self.ahead = None;
        report
    }

    /// Expert ids and weights of the last step, per layer (`--routing-stats`); empty rows
    /// for dense layers.
    pub fn last_routing(&self) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        if self.ahead.is_some() {
            return Err(ModelError::invalid("routing: a look-ahead step has overwritten the last step's routing"));
        }
        let k = self.top_k.max(1);
        let n = self.layers.len() * k;
        let ids: Vec<u32> = self.dev.read(self.s.ids, n).map_err(cuda_err)?;
        let w: Vec<f32> = self.dev.read(self.s.weights, n).map_err(cuda_err)?;
        Ok(self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| match &l.ff {
                DevFeedForward::Sparse { .. } => (ids[i * k..(i + 1) * k].to_vec(), w[i * k..(i + 1) * k].to_vec()),
                DevFeedForward::Dense(_) => (vec![], vec![]),
            })
            .collect())
    }

    /// Kernel launches of the last decode step, as issued (counted by the device while the
    /// step was captured into its graph, or while it ran eagerly); None before the first step.
    pub fn launches_per_token(&self) -> Option<usize> {
        self.last_launches
    }

    /// Enqueue one step for `token` at the current position (None: the token the last step
    /// left on the device). Nothing here waits for the device.
    fn step(&mut self, token: Option<u32>, head: Head) -> Result<()> {
        if self.len >= self.attn.max_len {
            return Err(ModelError::invalid(format!("KV cache full ({} tokens)", self.attn.max_len)));
        }
        if let Some(t) = token {
            self.dev.store_u32(self.s.token, t).map_err(cuda_err)?;
        }
        self.dev.store_u32(self.s.pos, self.len as u32).map_err(cuda_err)?;
        let (attn_kernel, qk_prologue) = attn_variant(self.len + 1);
        let key = (attn_kernel, qk_prologue, head);
        let before = self.dev.launch_count();
        if self.use_graph {
            if !self.graphs.contains_key(&key) {
                let dev = self.dev.clone();
                let graph = dev.capture(|d| self.enqueue_step(d, &self.s, key.0, key.1, key.2, &mut |_, _| Ok(()))).map_err(cuda_err)?;
                self.graphs.insert(key, (graph, (self.dev.launch_count() - before) as usize));
            }
            let (graph, launches) = &self.graphs[&key];
            graph.replay().map_err(cuda_err)?;
            self.last_launches = Some(*launches);
        } else {
            self.enqueue_step(&self.dev, &self.s, key.0, key.1, key.2, &mut |_, _| Ok(())).map_err(cuda_err)?;
            self.last_launches = Some((self.dev.launch_count() - before) as usize);
        }
        self.len += 1;
        Ok(())
    }

    /// Enqueue `tokens`, the last one with `head`; the ones before it run as concurrent
    /// steps ([`Self::prefill`]).
    fn run(&mut self, tokens: &[u32], head: Head) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ModelError::invalid(format!("token id {bad} is out of range (vocab size {})", self.vocab)));
        }
        let (last, hidden) = tokens.split_last().ok_or_else(|| ModelError::invalid("no tokens to run"))?;
        self.prefill(hidden)?;
        self.step(Some(*last), head)
    }

    /// How many prompt steps run at once: `ZMLX_PREFILL_LANES` (default
    /// [`DEFAULT_PREFILL_LANES`]; 0 or 1: one at a time). Not with MLX's CPU numerics (one attention workspace) or the one-launch expert
    /// kernel (its grid barrier needs the whole GPU).
    fn prefill_lanes(&self) -> usize {
        if self.mlx_cpu.is_some() || self.layers.iter().any(|l| l.moe.one_launch) {
            return 1;
        }
        self.prefill_lanes_max
    }

    /// Run prompt tokens whose logits nobody reads (all but the last). Steps for consecutive
    /// tokens run concurrently, one lane (stream) and one scratch set each, in chunks of a
    /// power of two up to `prefill_lanes` within one attention variant: token j's KV-cache
    /// work at layer l waits for token j-1's attention at layer l (so every row it reads is
    /// written), and nothing else orders them. Each step computes exactly what it computes alone
    /// (the same kernels on the same inputs): the logits equal the one-at-a-time prefill's
    /// bit for bit, which `zmlx validate` checks on CUDA. A captured graph per (variant, size).
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let lanes = self.prefill_lanes();
        let mut i = 0;
        while i < tokens.len() {
            let v = attn_variant(self.len + 1);
            let mut c = 1 << lanes.min(tokens.len() - i).ilog2();
            while c > 1 && (attn_variant(self.len + c) != v || self.len + c > self.attn.max_len) {
                c /= 2;
            }
            if c == 1 {
                self.step(Some(tokens[i]), Head::Hidden)?;
            } else {
                self.prefill_chunk(&tokens[i..i + c], v)?;
            }
            i += c;
        }
        Ok(())
    }

    fn prefill_chunk(&mut self, tokens: &[u32], (attn_kernel, qk_prologue): (AttnKernel, bool)) -> Result<()> {
        let c = tokens.len();
        while self.lane_scratch.len() < c {
            let bytes = Scratch::bytes(&self.args, self.dtype, &self.attn, false);
            let mut arena = self.dev.arena(bytes).map_err(cuda_err)?;
            let s = Scratch::carve(&self.dev, &mut arena, &self.args, self.dtype, &self.attn, Some(&self.s))?;
            self.device_bytes += arena.capacity();
            self.lane_scratch.push((s, arena));
        }
        for (j, &t) in tokens.iter().enumerate() {
            let s = &self.lane_scratch[j].0;
            self.dev.store_u32(s.token, t).map_err(cuda_err)?;
            self.dev.store_u32(s.pos, (self.len + j) as u32).map_err(cuda_err)?;
        }
        let key = (attn_kernel, qk_prologue, c);
        // The events live until the capture (or the eager enqueue) is over.
        let mut events = Vec::new();
        if self.use_graph {
            if !self.prefill_graphs.contains_key(&key) {
                let dev = self.dev.clone();
                let graph = dev.capture(|d| self.enqueue_prefill(d, c, attn_kernel, qk_prologue, &mut events)).map_err(cuda_err)?;
                self.prefill_graphs.insert(key, graph);
            }
            self.prefill_graphs[&key].replay().map_err(cuda_err)?;
        } else {
            self.enqueue_prefill(&self.dev, c, attn_kernel, qk_prologue, &mut events).map_err(cuda_err)?;
        }
        drop(events);
        self.len += c;
        Ok(())
    }

    /// The steps of `c` prompt tokens on lanes 1..=c (scratch sets `lane_scratch[..c]`), forked
    /// from and joined back to lane 0. The events that order them go to `events`.
    fn enqueue_prefill(&self, dev: &CudaDevice, c: usize, attn_kernel: AttnKernel, qk_prologue: bool, events: &mut Vec<Event>) -> zmlx_cuda::Result<()> {
        let fork = dev.record_event()?;
        // Per layer: the event after the previous token's attention.
        let mut attended: Vec<Option<usize>> = vec![None; self.layers.len()];
        let mut ends = Vec::new();
        for j in 0..c {
            dev.on_lane(j + 1, || {
                dev.wait_event(&fork)?;
                let mut kv_order = |layer: usize, before: bool| -> zmlx_cuda::Result<()> {
                    if before {
                        if let Some(e) = attended[layer] {
                            dev.wait_event(&events[e])?;
                        }
                    } else {
                        events.push(dev.record_event()?);
                        attended[layer] = Some(events.len() - 1);
                    }
                    Ok(())
                };
                self.enqueue_step(dev, &self.lane_scratch[j].0, attn_kernel, qk_prologue, Head::Hidden, &mut kv_order)?;
                ends.push(dev.record_event()?);
                Ok(())
            })?;
        }
        for e in &ends {
            dev.wait_event(e)?;
        }
        events.push(fork);
        events.extend(ends);
        Ok(())
    }

    /// Forget an enqueued look-ahead step: its KV row is rewritten by the step that takes its
    /// position, and the next step writes its own token.
    fn discard_ahead(&mut self) {
        if self.ahead.take().is_some() {
            self.len -= 1;
        }
    }

    /// The token the device chooses after `tokens` (greedy or sampled, by `head`), read back
    /// without stalling the device: with look-ahead on, the step for that token is enqueued
    /// before the host waits for it.
    fn next_token(&mut self, tokens: &[u32], head: Head) -> Result<u32> {
        // The step for `tokens` may already be enqueued: the look-ahead for the token we returned.
        let in_flight = self.ahead == Some(head) && tokens.len() == 1 && self.last_token == Some(tokens[0]);
        if !in_flight {
            self.discard_ahead();
            self.run(tokens, head)?;
        }
        self.ahead = None;
        self.dev.read_u32_async(self.s.token, &self.token_slot).map_err(cuda_err)?;
        if self.lookahead && self.len < self.attn.max_len {
            // The device holds the token, so the next step can start now.
            self.step(None, head)?;
            self.ahead = Some(head);
        }
        let t = self.token_slot.wait().map_err(cuda_err)?;
        self.last_token = Some(t);
        Ok(t)
    }
}

impl Drop for CudaQwen3Moe {
    fn drop(&mut self) {
        // A look-ahead step may still read the buffers and graphs dropped after this.
        self.dev.sync().ok();
    }
}

impl Decoder for CudaQwen3Moe {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.discard_ahead();
        self.run(tokens, Head::Greedy)?;
        let bytes: Vec<u8> = self.dev.read(self.s.logits, self.vocab * self.dtype.size_bytes()).map_err(cuda_err)?;
        Ok(zmlx_core::dtype::floats_from_le_bytes(self.dtype, &bytes).unwrap_or_default())
    }

    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        self.next_token(tokens, Head::Greedy)
    }

    fn forward_sample(&mut self, tokens: &[u32], params: &SampleParams, seed: u64, pos: usize) -> Result<u32> {
        if self.mlx_cpu.is_some() || !self.device_sampling || (params.min_p > 0.0 && !self.device_min_p) {
            // MLX's CPU numerics, ZMLX_DEVICE_SAMPLING=0, or min-p before its device check: the
            // host samples from the logits, as on the CPU.
            return sample_on_host(self, tokens, params, seed, pos);
        }
        // The device draws with the position it stores for the step's last token; a caller that
        // numbers positions otherwise (e.g. a session continued without `reset`) gets the same
        // definition from the host.
        let last_pos = self.len - usize::from(self.ahead.is_some()) + tokens.len() - 1;
        if pos != last_pos {
            return sample_on_host(self, tokens, params, seed, pos);
        }
        if self.seed_on_device != Some(seed) {
            if self.ahead.is_some() {
                // An enqueued step drew with the old seed.
                self.dev.sync().map_err(cuda_err)?;
                self.discard_ahead();
            }
            self.dev.store_u32(self.s.seed, seed as u32).map_err(cuda_err)?;
            self.dev.store_u32(self.s.seed + 4, (seed >> 32) as u32).map_err(cuda_err)?;
            self.seed_on_device = Some(seed);
        }
        self.next_token(tokens, Head::Sample(SampleKey::new(params)))
    }

    fn reset(&mut self) {
        self.len = 0;
        self.ahead = None;
    }

    fn set_prefill_lanes(&mut self, lanes: usize) {
        self.prefill_lanes_max = lanes.max(1);
    }

    fn prefill_lanes(&self) -> usize {
        CudaQwen3Moe::prefill_lanes(self)
    }

    fn set_lookahead(&mut self, on: bool) {
        self.lookahead = on && self.lookahead_allowed;
        if !on && self.ahead.is_some() {
            // Let the unused step finish here, not inside whatever the caller times next.
            self.dev.sync().ok();
            self.discard_ahead();
        }
    }

    fn patch(&mut self, patterns: &[Pattern]) -> Result<PatchReport> {
        Ok(CudaQwen3Moe::patch(self, patterns))
    }

    fn backend(&self) -> Backend {
        Backend::Cuda
    }

    fn launches_per_token(&self) -> Option<usize> {
        CudaQwen3Moe::launches_per_token(self)
    }

    fn last_routing(&self) -> Result<Option<Vec<(Vec<u32>, Vec<f32>)>>> {
        CudaQwen3Moe::last_routing(self).map(Some)
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn peak_memory_bytes(&self) -> u64 {
        self.device_bytes as u64
    }
}
