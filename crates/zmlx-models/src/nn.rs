//! The shared pieces of mlx-lm's models (`mlx.nn` + `mlx_lm.models.*`), CPU reference.
//! Every op rounds to the model dtype where MLX does; see zmlx_core::ops.

use zmlx_core::{mlx_math, ops, DType, QuantSpec, QuantizedMatrix};

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::config::Quantization;
use crate::error::{ModelError, Result};

/// `nn.Linear` / `nn.QuantizedLinear` without bias.
#[derive(Clone, Debug)]
pub enum Linear {
    Dense { weight: Vec<f32>, out_dims: usize, in_dims: usize },
    Quantized(QuantizedMatrix),
}

impl Linear {
    pub fn out_dims(&self) -> usize {
        match self {
            Linear::Dense { out_dims, .. } => *out_dims,
            Linear::Quantized(q) => q.rows,
        }
    }

    pub fn in_dims(&self) -> usize {
        match self {
            Linear::Dense { in_dims, .. } => *in_dims,
            Linear::Quantized(q) => q.cols,
        }
    }

    /// `x` is `[m, in_dims]`; returns `[m, out_dims]`.
    pub fn forward(&self, x: &[f32], dtype: DType) -> Vec<f32> {
        match self {
            Linear::Dense { weight, in_dims, .. } => ops::matmul_t(x, weight, *in_dims, dtype),
            Linear::Quantized(q) => q.matmul_t(x, x.len() / q.cols),
        }
    }

    /// Output `row` for one input vector: the value `forward` computes for it
    /// (`buf`: `in_dims` scratch).
    pub fn dot_row(&self, row: usize, x: &[f32], buf: &mut [f32], dtype: DType) -> f32 {
        match self {
            Linear::Dense { weight, in_dims, .. } => {
                let mut acc = 0.0f32;
                for (a, b) in x.iter().zip(&weight[row * in_dims..(row + 1) * in_dims]) {
                    acc += a * b;
                }
                dtype.round(acc)
            }
            Linear::Quantized(q) => q.dot_row(row, x, buf),
        }
    }

    pub fn quant_spec(&self) -> Option<QuantSpec> {
        match self {
            Linear::Dense { .. } => None,
            Linear::Quantized(q) => Some(q.spec),
        }
    }
}

/// `nn.Embedding` / `nn.QuantizedEmbedding`.
#[derive(Clone, Debug)]
pub enum Embedding {
    Dense { weight: Vec<f32>, vocab: usize, dims: usize },
    Quantized(QuantizedMatrix),
}

impl Embedding {
    pub fn vocab(&self) -> usize {
        match self {
            Embedding::Dense { vocab, .. } => *vocab,
            Embedding::Quantized(q) => q.rows,
        }
    }

    /// Rows for `ids` (already checked `< vocab`), `[ids.len(), dims]`.
    pub fn lookup(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::new();
        for &id in ids {
            match self {
                Embedding::Dense { weight, dims, .. } => out.extend_from_slice(&weight[id as usize * dims..(id as usize + 1) * dims]),
                Embedding::Quantized(q) => out.extend(q.dequantize_row(id as usize)),
            }
        }
        out
    }

    /// `embed_tokens.as_linear(x)` for tied word embeddings.
    pub fn as_linear(&self, x: &[f32], dtype: DType) -> Vec<f32> {
        match self {
            Embedding::Dense { weight, dims, .. } => ops::matmul_t(x, weight, *dims, dtype),
            Embedding::Quantized(q) => q.matmul_t(x, x.len() / q.cols),
        }
    }
}

/// `nn.RMSNorm`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &[f32], dtype: DType) -> Vec<f32> {
        ops::rms_norm(x, &self.weight, self.eps, dtype)
    }

    /// `add_rms_norm` patch: `h = x + delta` and `norm(h)` in one pass per row.
    pub fn add_forward(&self, x: &[f32], delta: &[f32], dtype: DType) -> (Vec<f32>, Vec<f32>) {
        let d = self.weight.len();
        let mut h = Vec::with_capacity(x.len());
        let mut normed = Vec::with_capacity(x.len());
        for (xr, dr) in x.chunks_exact(d).zip(delta.chunks_exact(d)) {
            let hr: Vec<f32> = xr.iter().zip(dr).map(|(a, b)| dtype.round(a + b)).collect();
            normed.extend(ops::rms_norm(&hr, &self.weight, self.eps, dtype));
            h.extend(hr);
        }
        (h, normed)
    }
}

/// `nn.RoPE` (and the `rope_scaling`-free `initialize_rope`).
#[derive(Clone, Debug)]
pub struct Rope {
    pub dims: usize,
    pub base: f32,
    pub scale: f32,
    pub traditional: bool,
}

impl Rope {
    /// `x` is `[heads, len, head_dim]` at positions `offset..offset+len`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, len: usize, offset: usize, dtype: DType) {
        let (c, s) = self.tables(len, offset, dtype);
        ops::rope_apply(x, head_dim, self.dims, len, &c, &s, dtype);
    }

    /// cos/sin tables `[len, dims/2]` for positions `offset..offset+len`.
    pub fn tables(&self, len: usize, offset: usize, dtype: DType) -> (Vec<f32>, Vec<f32>) {
        assert!(!self.traditional, "traditional RoPE is not used by the supported families yet");
        ops::rope_tables(self.dims, self.base, self.scale, offset, len, dtype)
    }
}

/// mlx-lm's `KVCache` for one layer: keys and values `[kv_heads, len, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub len: usize,
}

impl KvCache {
    pub fn new(kv_heads: usize) -> Self {
        KvCache { keys: vec![Vec::new(); kv_heads], values: vec![Vec::new(); kv_heads], len: 0 }
    }

    /// Append `[kv_heads, l, d]` keys/values; returns the full `[kv_heads, len, d]` views, concatenated.
    pub fn update_and_fetch(&mut self, k: &[f32], v: &[f32], l: usize) -> (Vec<f32>, Vec<f32>) {
        let heads = self.keys.len();
        let per_head = k.len() / heads;
        for h in 0..heads {
            self.keys[h].extend_from_slice(&k[h * per_head..(h + 1) * per_head]);
            self.values[h].extend_from_slice(&v[h * per_head..(h + 1) * per_head]);
        }
        self.len += l;
        (self.keys.concat(), self.values.concat())
    }
}

/// `[l, heads, d]` → `[heads, l, d]`.
pub fn to_heads_first(x: &[f32], l: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for t in 0..l {
        for h in 0..heads {
            out[(h * l + t) * d..(h * l + t + 1) * d].copy_from_slice(&x[(t * heads + h) * d..(t * heads + h + 1) * d]);
        }
    }
    out
}

/// `[heads, l, d]` → `[l, heads, d]`.
pub fn to_tokens_first(x: &[f32], l: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for h in 0..heads {
        for t in 0..l {
            out[(t * heads + h) * d..(t * heads + h + 1) * d].copy_from_slice(&x[(h * l + t) * d..(h * l + t + 1) * d]);
        }
    }
    out
}

/// Elementwise `a + b` rounded to the dtype (residual connections).
pub fn add(a: &[f32], b: &[f32], dtype: DType) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| dtype.round(x + y)).collect()
}

/// mlx-lm's `swiglu(gate, up)`.
pub fn swiglu(gate: &[f32], up: &[f32], dtype: DType) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| mlx_math::swiglu(dtype, g, u)).collect()
}

/// Dense SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj`).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// `swiglu_mlp` patch: gate, up and swiglu in one pass over the rows.
    pub fused: bool,
}

impl Mlp {
    pub fn forward(&self, x: &[f32], dtype: DType) -> Vec<f32> {
        let act = if self.fused {
            let d = self.gate_proj.in_dims();
            x.chunks_exact(d).flat_map(|row| self.gate_up_swiglu(row, dtype)).collect()
        } else {
            let g = self.gate_proj.forward(x, dtype);
            let u = self.up_proj.forward(x, dtype);
            swiglu(&g, &u, dtype)
        };
        self.down_proj.forward(&act, dtype)
    }

    /// `swiglu(gate(x), up(x))` for one row, each output from one pass over both weight rows.
    pub fn gate_up_swiglu(&self, x: &[f32], dtype: DType) -> Vec<f32> {
        let mut buf = vec![0.0; x.len()];
        (0..self.gate_proj.out_dims())
            .map(|n| {
                let g = self.gate_proj.dot_row(n, x, &mut buf, dtype);
                let u = self.up_proj.dot_row(n, x, &mut buf, dtype);
                mlx_math::swiglu(dtype, g, u)
            })
            .collect()
    }
}

/// mlx-lm's `SwitchGLU`: one `Mlp` per expert, applied to the experts a token chose.
#[derive(Clone, Debug)]
pub struct SwitchGlu {
    pub experts: Vec<Mlp>,
}

impl SwitchGlu {
    /// One token `x` `[dims]` through experts `inds`; returns `[inds.len(), dims]`.
    /// (mlx-lm sorts tokens by expert for large batches; on the CPU every row is
    /// computed independently, so the values are the same either way.)
    pub fn forward(&self, x: &[f32], inds: &[u32], dtype: DType) -> Vec<Vec<f32>> {
        inds.iter().map(|&e| self.experts[e as usize].forward(x, dtype)).collect()
    }
}

/// The three tensors of an MLX-quantized module, shapes checked against the config.
pub struct QuantizedTensors<'a> {
    pub spec: QuantSpec,
    pub weight: TensorRef<'a>,
    pub scales: TensorRef<'a>,
    pub biases: TensorRef<'a>,
}

/// `module`'s quantized tensors, or `None` when it was saved unquantized (mlx-lm's rule:
/// quantized iff `.scales` exists). `rows_shape` is `[out]` or `[experts, out]`, `cols` the input dims.
pub fn quantized_tensors<'a>(ckpt: &'a Checkpoint, quant: &Quantization, module: &str, rows_shape: &[usize], cols: usize) -> Result<Option<QuantizedTensors<'a>>> {
    let scales_name = format!("{module}.scales");
    if !ckpt.contains(&scales_name) {
        return Ok(None);
    }
    let spec = quant
        .spec_for(module)
        .ok_or_else(|| ModelError::invalid(format!("`{module}` has quantized weights but config.json has no quantization for it")))?;
    let weight = ckpt.get(&format!("{module}.weight"))?;
    let scales = ckpt.get(&scales_name)?;
    let biases = ckpt.get(&format!("{module}.biases"))?;
    if cols % spec.group_size != 0 {
        return Err(ModelError::file(weight.path, format!("`{module}`: input dims {cols} not a multiple of group size {}", spec.group_size)));
    }
    let mut wshape = rows_shape.to_vec();
    wshape.push(spec.packed_cols(cols));
    weight.expect_shape(&wshape)?;
    let mut sshape = rows_shape.to_vec();
    sshape.push(cols / spec.group_size);
    scales.expect_shape(&sshape)?;
    biases.expect_shape(&sshape)?;
    Ok(Some(QuantizedTensors { spec, weight, scales, biases }))
}

/// Reads modules from a checkpoint by their mlx-lm names, checking shapes against the config.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub quant: &'a Quantization,
    pub dtype: DType,
}

impl<'a> Loader<'a> {
    fn quantized(&self, module: &str, rows_shape: &[usize], cols: usize) -> Result<Option<Vec<QuantizedMatrix>>> {
        let Some(QuantizedTensors { spec, weight: w, scales: s, biases: b }) = quantized_tensors(self.ckpt, self.quant, module, rows_shape, cols)? else {
            return Ok(None);
        };
        let words = w.to_u32()?;
        let scales = s.to_f32()?;
        let biases = b.to_f32()?;
        let dtype = s.dtype;
        let rows = *rows_shape.last().unwrap_or(&1);
        let mats: usize = rows_shape[..rows_shape.len() - 1].iter().product();
        let (wn, sn) = (words.len() / mats, scales.len() / mats);
        (0..mats)
            .map(|i| {
                QuantizedMatrix::from_parts(
                    rows,
                    cols,
                    spec,
                    words[i * wn..(i + 1) * wn].to_vec(),
                    scales[i * sn..(i + 1) * sn].to_vec(),
                    biases[i * sn..(i + 1) * sn].to_vec(),
                    dtype,
                )
                .map_err(|e| ModelError::file(w.path, format!("`{module}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn dense(&self, module: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let w = self.ckpt.get(&format!("{module}.weight"))?;
        w.expect_shape(shape)?;
        w.to_f32()
    }

    pub fn linear(&self, module: &str, out_dims: usize, in_dims: usize) -> Result<Linear> {
        if let Some(mut q) = self.quantized(module, &[out_dims], in_dims)? {
            return Ok(Linear::Quantized(q.remove(0)));
        }
        Ok(Linear::Dense { weight: self.dense(module, &[out_dims, in_dims])?, out_dims, in_dims })
    }

    /// A `SwitchLinear` stored as `[experts, out, in]`, split per expert.
    pub fn switch_linear(&self, module: &str, experts: usize, out_dims: usize, in_dims: usize) -> Result<Vec<Linear>> {
        if let Some(q) = self.quantized(module, &[experts, out_dims], in_dims)? {
            return Ok(q.into_iter().map(Linear::Quantized).collect());
        }
        let w = self.dense(module, &[experts, out_dims, in_dims])?;
        Ok(w.chunks_exact(out_dims * in_dims)
            .map(|c| Linear::Dense { weight: c.to_vec(), out_dims, in_dims })
            .collect())
    }

    pub fn switch_glu(&self, module: &str, experts: usize, hidden: usize, dims: usize) -> Result<SwitchGlu> {
        let gate = self.switch_linear(&format!("{module}.gate_proj"), experts, hidden, dims)?;
        let up = self.switch_linear(&format!("{module}.up_proj"), experts, hidden, dims)?;
        let down = self.switch_linear(&format!("{module}.down_proj"), experts, dims, hidden)?;
        let experts = gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate_proj, up_proj), down_proj)| Mlp { gate_proj, up_proj, down_proj, fused: false })
            .collect();
        Ok(SwitchGlu { experts })
    }

    pub fn mlp(&self, module: &str, hidden: usize, dims: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: self.linear(&format!("{module}.gate_proj"), hidden, dims)?,
            up_proj: self.linear(&format!("{module}.up_proj"), hidden, dims)?,
            down_proj: self.linear(&format!("{module}.down_proj"), dims, hidden)?,
            fused: false,
        })
    }

    pub fn embedding(&self, module: &str, vocab: usize, dims: usize) -> Result<Embedding> {
        if let Some(mut q) = self.quantized(module, &[vocab], dims)? {
            return Ok(Embedding::Quantized(q.remove(0)));
        }
        Ok(Embedding::Dense { weight: self.dense(module, &[vocab, dims])?, vocab, dims })
    }

    pub fn rms_norm(&self, module: &str, dims: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.dense(module, &[dims])?, eps })
    }

    /// The compute dtype: that of the embedding (its scales when quantized), as in mlx-lm.
    pub fn infer_dtype(ckpt: &Checkpoint, embed_module: &str) -> Result<DType> {
        let name = format!("{embed_module}.scales");
        let t = if ckpt.contains(&name) { ckpt.get(&name)? } else { ckpt.get(&format!("{embed_module}.weight"))? };
        if !t.dtype.is_float() {
            return Err(ModelError::file(t.path, format!("tensor `{}` has dtype {}, expected a float", t.name, t.dtype)));
        }
        Ok(t.dtype)
    }
}
