//! Qwen3-MoE decode on CUDA: the unfused path. It computes what mlx-lm computes, op by op
//! (router matmul, softmax, top-k, one gathered quantized matmul per projection, SiLU·mul,
//! weighted sum), one token per step, with every buffer preallocated and the step
//! captured once into a CUDA graph that is replayed for each token.

use std::sync::Arc;

use zmlx_core::{DType, QuantizedMatrix};
use zmlx_cuda::{ops, Arena, AttnShape, CudaDevice, CudaGraph, DevBuf, QuantWeight};

use crate::error::{ModelError, Result};
use crate::generate::Decoder;
use crate::models::qwen3_moe::{FeedForward, Model};
use crate::nn::{Embedding, Linear, Mlp};

fn cuda_err(e: zmlx_cuda::CudaError) -> ModelError {
    ModelError::invalid(format!("CUDA: {e}"))
}

/// f32 carriers of `dtype` values → the dtype's little-endian bytes.
pub fn to_device_bytes(dtype: DType, xs: &[f32]) -> Vec<u8> {
    match dtype {
        DType::BF16 => xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F16 => xs.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        _ => xs.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// The dtype's bytes → f32.
pub fn from_device_bytes(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    zmlx_core::dtype::floats_from_le_bytes(dtype, bytes).unwrap_or_default()
}

/// Weights uploaded once; the buffers own the memory, `QuantWeight` holds their addresses.
struct Uploaded {
    _bufs: Vec<DevBuf>,
}

struct Uploader<'a> {
    dev: &'a CudaDevice,
    dtype: DType,
    bufs: Vec<DevBuf>,
    bytes: usize,
}

impl Uploader<'_> {
    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        let b = self.dev.upload(bytes).map_err(cuda_err)?;
        let p = b.ptr();
        self.bytes += bytes.len();
        self.bufs.push(b);
        Ok(p)
    }

    fn floats(&mut self, xs: &[f32]) -> Result<u64> {
        let bytes = to_device_bytes(self.dtype, xs);
        self.upload(&bytes)
    }

    /// Experts stacked `[E, N, K]` (one matrix: E = 1).
    fn quantized(&mut self, mats: &[&QuantizedMatrix]) -> Result<QuantWeight> {
        let q0 = mats[0];
        if mats.iter().any(|q| q.spec != q0.spec || q.rows != q0.rows || q.cols != q0.cols) {
            return Err(ModelError::invalid("experts of one projection must share shape and quantization"));
        }
        let words: Vec<u8> = mats.iter().flat_map(|q| q.words.iter().flat_map(|w| w.to_le_bytes())).collect();
        let scales: Vec<f32> = mats.iter().flat_map(|q| q.scales.iter().copied()).collect();
        let biases: Vec<f32> = mats.iter().flat_map(|q| q.biases.iter().copied()).collect();
        Ok(QuantWeight {
            w: self.upload(&words)?,
            scales: self.floats(&scales)?,
            biases: self.floats(&biases)?,
            n: q0.rows,
            k: q0.cols,
            bits: q0.spec.bits,
            group_size: q0.spec.group_size as u32,
            n_experts: mats.len(),
        })
    }

    fn linears(&mut self, what: &str, ls: &[&Linear]) -> Result<QuantWeight> {
        let mats: Vec<&QuantizedMatrix> = ls
            .iter()
            .map(|l| match l {
                Linear::Quantized(q) => Ok(q),
                Linear::Dense { .. } => Err(ModelError::invalid(format!(
                    "`{what}` is unquantized: the CUDA backend runs MLX affine-quantized linears only for now"
                ))),
            })
            .collect::<Result<_>>()?;
        self.quantized(&mats)
    }
}

struct DevMlp {
    gate: QuantWeight,
    up: QuantWeight,
    down: QuantWeight,
}

enum DevFeedForward {
    Sparse { router: QuantWeight, experts: DevMlp, top_k: usize, renorm: bool },
    Dense(DevMlp),
}

struct DevLayer {
    q: QuantWeight,
    k: QuantWeight,
    v: QuantWeight,
    o: QuantWeight,
    q_norm: u64,
    k_norm: u64,
    in_norm: u64,
    post_norm: u64,
    ff: DevFeedForward,
    k_cache: u64,
    v_cache: u64,
}

/// Activations and scratch, all carved from one arena at load.
struct Scratch {
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
    embed: QuantWeight,
    lm_head: QuantWeight,
    final_norm: u64,
    layers: Vec<DevLayer>,
    s: Scratch,
    _weights: Uploaded,
    _arena: Arena,
    graph: Option<CudaGraph>,
    use_graph: bool,
    /// Tokens in the KV cache.
    len: usize,
    pub weight_bytes: usize,
    /// Everything this engine allocated on the device (weights, KV caches, arena).
    pub device_bytes: usize,
}

impl CudaQwen3Moe {
    /// Upload a loaded model; `max_len` is the KV-cache capacity in tokens.
    pub fn new(dev: Arc<CudaDevice>, model: &Model, max_len: usize, use_graph: bool) -> Result<Self> {
        let a = &model.args;
        let dtype = model.dtype;
        let mut up = Uploader { dev: &dev, dtype, bufs: Vec::new(), bytes: 0 };
        let embed = match &model.embed_tokens {
            Embedding::Quantized(q) => up.quantized(&[q])?,
            Embedding::Dense { .. } => return Err(ModelError::invalid("unquantized embeddings are not supported on CUDA yet")),
        };
        let lm_head = match &model.lm_head {
            Some(head) => up.linears("lm_head", &[head])?,
            None => embed,
        };
        let hd = a.head_dim();
        let max_len = max_len.clamp(1, a.max_position_embeddings);
        let attn = AttnShape { n_heads: a.num_attention_heads, n_kv_heads: a.num_key_value_heads, head_dim: hd, max_len };
        let cache_bytes = a.num_key_value_heads * max_len * hd * dtype.size_bytes();
        let mut layers = Vec::new();
        let mut caches = Vec::new();
        for (i, l) in model.layers.iter().enumerate() {
            let sa = &l.self_attn;
            let mlp_of = |up: &mut Uploader, name: &str, ms: &[&Mlp]| -> Result<DevMlp> {
                Ok(DevMlp {
                    gate: up.linears(&format!("{name}.gate_proj"), &ms.iter().map(|m| &m.gate_proj).collect::<Vec<_>>())?,
                    up: up.linears(&format!("{name}.up_proj"), &ms.iter().map(|m| &m.up_proj).collect::<Vec<_>>())?,
                    down: up.linears(&format!("{name}.down_proj"), &ms.iter().map(|m| &m.down_proj).collect::<Vec<_>>())?,
                })
            };
            let ff = match &l.mlp {
                FeedForward::Sparse(moe) => DevFeedForward::Sparse {
                    router: up.linears(&format!("model.layers.{i}.mlp.gate"), &[&moe.gate])?,
                    experts: mlp_of(&mut up, &format!("model.layers.{i}.mlp.switch_mlp"), &moe.switch_mlp.experts.iter().collect::<Vec<_>>())?,
                    top_k: moe.top_k,
                    renorm: moe.norm_topk_prob,
                },
                FeedForward::Dense(m) => DevFeedForward::Dense(mlp_of(&mut up, &format!("model.layers.{i}.mlp"), &[m])?),
            };
            let p = format!("model.layers.{i}.self_attn");
            let k_cache = dev.alloc(cache_bytes).map_err(cuda_err)?;
            let v_cache = dev.alloc(cache_bytes).map_err(cuda_err)?;
            layers.push(DevLayer {
                q: up.linears(&format!("{p}.q_proj"), &[&sa.q_proj])?,
                k: up.linears(&format!("{p}.k_proj"), &[&sa.k_proj])?,
                v: up.linears(&format!("{p}.v_proj"), &[&sa.v_proj])?,
                o: up.linears(&format!("{p}.o_proj"), &[&sa.o_proj])?,
                q_norm: up.floats(&sa.q_norm.weight)?,
                k_norm: up.floats(&sa.k_norm.weight)?,
                in_norm: up.floats(&l.input_layernorm.weight)?,
                post_norm: up.floats(&l.post_attention_layernorm.weight)?,
                ff,
                k_cache: k_cache.ptr(),
                v_cache: v_cache.ptr(),
            });
            caches.push(k_cache);
            caches.push(v_cache);
        }
        let final_norm = up.floats(&model.norm.weight)?;
        let weight_bytes = up.bytes;
        let mut bufs = up.bufs;
        bufs.extend(caches);

        let es = dtype.size_bytes();
        let d = a.hidden_size;
        let k = a.num_experts_per_tok.max(1);
        let inter = a.moe_intermediate_size.max(a.intermediate_size);
        let qd = a.num_attention_heads * hd;
        let kvd = a.num_key_value_heads * hd;
        let sizes = [4, 4, d * es, d * es, qd * es, kvd * es, kvd * es, qd * es, d * es, a.num_experts.max(1) * es, k * 4, k * 4, k * inter * es, k * inter * es, k * inter * es, k * d * es, d * es, a.vocab_size * es, attn.workspace_bytes()];
        let mut arena = dev.arena(sizes.iter().map(|s| s.div_ceil(256) * 256 + 256).sum()).map_err(cuda_err)?;
        let mut next = |i: usize| arena.alloc(sizes[i]).map_err(cuda_err);
        let s = Scratch {
            token: next(0)?,
            pos: next(1)?,
            x: next(2)?,
            xn: next(3)?,
            q: next(4)?,
            k: next(5)?,
            v: next(6)?,
            attn: next(7)?,
            o: next(8)?,
            router: next(9)?,
            ids: next(10)?,
            weights: next(11)?,
            g: next(12)?,
            u: next(13)?,
            act: next(14)?,
            y: next(15)?,
            ff_out: next(16)?,
            logits: next(17)?,
            att_ws: next(18)?,
        };
        let device_bytes = weight_bytes + 2 * cache_bytes * model.layers.len() + arena.capacity();
        Ok(CudaQwen3Moe {
            dev,
            dtype,
            eps: a.rms_norm_eps,
            hidden: d,
            vocab: a.vocab_size,
            rope_base: a.rope_theta,
            head_dim: hd,
            attn,
            scale: (hd as f32).powf(-0.5),
            embed,
            lm_head,
            final_norm,
            layers,
            s,
            _weights: Uploaded { _bufs: bufs },
            _arena: arena,
            graph: None,
            use_graph,
            len: 0,
            weight_bytes,
            device_bytes,
        })
    }

    /// Enqueue one decode step: token at `s.token`, position at `s.pos`; leaves logits in
    /// `s.logits` and the greedy token in `s.token`.
    fn enqueue_step(&self, dev: &CudaDevice) -> zmlx_cuda::Result<()> {
        let (dt, s, d, hd) = (self.dtype, &self.s, self.hidden, self.head_dim);
        let (hq, hkv) = (self.attn.n_heads, self.attn.n_kv_heads);
        ops::embed(dev, dt, &self.embed, s.token, s.x)?;
        for l in &self.layers {
            ops::rms_norm(dev, dt, s.x, l.in_norm, s.xn, 1, d, self.eps)?;
            ops::qmv(dev, dt, &l.q, s.xn, s.q)?;
            ops::qmv(dev, dt, &l.k, s.xn, s.k)?;
            ops::qmv(dev, dt, &l.v, s.xn, s.v)?;
            ops::rms_norm(dev, dt, s.q, l.q_norm, s.q, hq, hd, self.eps)?;
            ops::rms_norm(dev, dt, s.k, l.k_norm, s.k, hkv, hd, self.eps)?;
            ops::rope(dev, dt, s.q, s.q, s.pos, 0, hq, hd, hd, self.rope_base, 1.0)?;
            ops::rope(dev, dt, s.k, s.k, s.pos, 0, hkv, hd, hd, self.rope_base, 1.0)?;
            ops::kv_append(dev, dt, &self.attn, s.k, s.v, l.k_cache, l.v_cache, s.pos, 0)?;
            ops::attention_decode(dev, dt, &self.attn, s.q, l.k_cache, l.v_cache, s.pos, 1, self.scale, s.att_ws, s.attn)?;
            ops::qmv(dev, dt, &l.o, s.attn, s.o)?;
            ops::add(dev, dt, s.x, s.o, s.x, d)?;
            ops::rms_norm(dev, dt, s.x, l.post_norm, s.xn, 1, d, self.eps)?;
            match &l.ff {
                DevFeedForward::Sparse { router, experts, top_k, renorm } => {
                    let inter = experts.gate.n;
                    ops::qmv(dev, dt, router, s.xn, s.router)?;
                    ops::softmax_topk(dev, dt, s.router, 1, router.n, *top_k, true, *renorm, s.ids, s.weights)?;
                    ops::gather_qmv(dev, dt, &experts.gate, s.ids, *top_k, s.xn, false, s.g)?;
                    ops::gather_qmv(dev, dt, &experts.up, s.ids, *top_k, s.xn, false, s.u)?;
                    ops::swiglu(dev, dt, s.g, s.u, s.act, top_k * inter)?;
                    ops::gather_qmv(dev, dt, &experts.down, s.ids, *top_k, s.act, true, s.y)?;
                    ops::moe_combine(dev, dt, s.y, s.weights, s.ff_out, *top_k, d)?;
                }
                DevFeedForward::Dense(m) => {
                    ops::qmv(dev, dt, &m.gate, s.xn, s.g)?;
                    ops::qmv(dev, dt, &m.up, s.xn, s.u)?;
                    ops::swiglu(dev, dt, s.g, s.u, s.act, m.gate.n)?;
                    ops::qmv(dev, dt, &m.down, s.act, s.ff_out)?;
                }
            }
            ops::add(dev, dt, s.x, s.ff_out, s.x, d)?;
        }
        ops::rms_norm(dev, dt, s.x, self.final_norm, s.xn, 1, d, self.eps)?;
        ops::qmv(dev, dt, &self.lm_head, s.xn, s.logits)?;
        ops::argmax(dev, dt, s.logits, self.vocab, s.token)
    }

    /// Run one step for `token` at the current position.
    fn step(&mut self, token: u32) -> Result<()> {
        if self.len >= self.attn.max_len {
            return Err(ModelError::invalid(format!("KV cache full ({} tokens)", self.attn.max_len)));
        }
        self.dev.write(self.s.token, &[token]).map_err(cuda_err)?;
        self.dev.write(self.s.pos, &[self.len as i32]).map_err(cuda_err)?;
        if self.use_graph {
            if self.graph.is_none() {
                let dev = self.dev.clone();
                self.graph = Some(dev.capture(|d| self.enqueue_step(d)).map_err(cuda_err)?);
            }
            self.graph.as_ref().unwrap().replay().map_err(cuda_err)?;
        } else {
            self.enqueue_step(&self.dev).map_err(cuda_err)?;
        }
        self.len += 1;
        Ok(())
    }

    fn run(&mut self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ModelError::invalid(format!("token id {bad} is out of range (vocab size {})", self.vocab)));
        }
        for &t in tokens {
            self.step(t)?;
        }
        Ok(())
    }

    /// Kernel launches in one decode step (counted from the step's structure).
    pub fn launches_per_token(&self) -> usize {
        let per_layer: usize = self.layers.iter().map(|l| 14 + match l.ff { DevFeedForward::Sparse { .. } => 7, DevFeedForward::Dense(_) => 4 } + 1).sum();
        1 + per_layer + 3
    }
}

impl Decoder for CudaQwen3Moe {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run(tokens)?;
        let bytes: Vec<u8> = self.dev.read(self.s.logits, self.vocab * self.dtype.size_bytes()).map_err(cuda_err)?;
        Ok(from_device_bytes(self.dtype, &bytes))
    }

    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        self.run(tokens)?;
        let t: Vec<u32> = self.dev.read(self.s.token, 1).map_err(cuda_err)?;
        Ok(t[0])
    }

    fn reset(&mut self) {
        self.len = 0;
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
