// Decode-step kernels other than the quantized matmuls. Rounding contracts are in
// docs/kernels.md; every op whose MLX counterpart rounds to the dtype rounds here too.

// rms_norm over rows of length n: f32 sum of squares (tree order), mean = sum * inv_n,
// r = 1/sqrt(mean + eps), out = r(r(x*r) * w).
template <class D>
__device__ __forceinline__ void rms_norm_impl(const typename D::T* __restrict__ x, const typename D::T* __restrict__ w,
                                              typename D::T* __restrict__ y, int n, float eps, float inv_n) {
  __shared__ float red[32];
  x += (long long)blockIdx.x * n;
  y += (long long)blockIdx.x * n;
  const int nt = blockDim.x;
  if (n <= 8 * nt) {  // all loads in flight at once, values stay in registers
    float v[8], wv[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * nt;
      v[j] = i < n ? D::ld(x[i]) : 0.0f;
      wv[j] = i < n ? D::ld(w[i]) : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) ss = fmaf(v[j], v[j], ss);
    ss = block_sum(ss, red);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * nt;
      if (i < n) y[i] = D::st(__fmul_rn(D::rnd(__fmul_rn(v[j], r)), wv[j]));
    }
    return;
  }
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += nt) { float v = D::ld(x[i]); ss = fmaf(v, v, ss); }
  ss = block_sum(ss, red);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
  for (int i = threadIdx.x; i < n; i += nt) {
    float v = D::rnd(__fmul_rn(D::ld(x[i]), r));
    y[i] = D::st(__fmul_rn(v, D::ld(w[i])));
  }
}

// Non-traditional RoPE on rows of head_dim, rotating the first `dims` features; the
// position is *pos_ptr + pos_add. inv_freq_i = mlx_exp(-(i) * step), step = ln(base)/half
// (f32, host side), theta = r32(pos*scale) * inv_freq, cos/sin by MLX's polynomials,
// rounded to dtype; out1 = r(r(x1 c) - r(x2 s)), out2 = r(r(x1 s) + r(x2 c)).
template <class D>
__device__ __forceinline__ void rope_impl(const typename D::T* x, typename D::T* y, const int* __restrict__ pos_ptr,
                                          int pos_add, int rows, int head_dim, int dims, float step, float scale) {
  const int half = dims >> 1;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int pos = *pos_ptr + pos_add;
  if (idx < rows * half) {
    const int row = idx / half, i = idx - row * half;
    const float inv = mlx_exp(__fmul_rn(-(float)i, step));
    const float theta = __fmul_rn(__fmul_rn((float)pos, scale), inv);
    const float c = D::rnd(mlx_cos(theta)), s = D::rnd(mlx_sin(theta));
    const long long o = (long long)row * head_dim;
    const float x1 = D::ld(x[o + i]), x2 = D::ld(x[o + i + half]);
    const float o1 = D::rnd(__fsub_rn(D::rnd(__fmul_rn(x1, c)), D::rnd(__fmul_rn(x2, s))));
    const float o2 = D::rnd(__fadd_rn(D::rnd(__fmul_rn(x1, s)), D::rnd(__fmul_rn(x2, c))));
    y[o + i] = D::st(o1);
    y[o + i + half] = D::st(o2);
  }
  const int rest = head_dim - dims;
  if (rest > 0 && idx < rows * rest) {
    const int row = idx / rest, j = dims + (idx - row * rest);
    y[(long long)row * head_dim + j] = x[(long long)row * head_dim + j];
  }
}

// KV-cache append: cache [n_kv, max_len, hd]; writes k/v [n_kv, hd] at position *pos_ptr + pos_add.
template <class D>
__device__ __forceinline__ void kv_append_impl(const typename D::T* __restrict__ k, const typename D::T* __restrict__ v,
                                               typename D::T* kc, typename D::T* vc, const int* __restrict__ pos_ptr,
                                               int pos_add, int n_kv, int max_len, int hd) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n_kv * hd) return;
  const int pos = *pos_ptr + pos_add;
  if (pos < 0 || pos >= max_len) return;
  const int h = idx / hd, d = idx - h * hd;
  const long long o = ((long long)h * max_len + pos) * hd + d;
  kc[o] = k[idx];
  vc[o] = v[idx];
}

// Flash-decoding attention, pass 1. Block (kv head h, split s) covers positions
// [s*CHUNK, min((s+1)*CHUNK, len)) for the G query heads of h (GQA: q head i uses kv head
// i / G). q is first scaled MLX-style: r(q * r(scale)). Scores and softmax in f32 (MLX exp),
// partial output o = sum_t p_t v_t in f32. Writes [G][HD + 2] floats: o, max, sum.
// All of a thread's K (and then V) loads are issued before their first use, so a block
// waits on memory about twice, not once per row.
#define ATT_CHUNK 128
#define ATT_GMAX 16
#define ATT_THREADS 256
template <class D> __device__ __forceinline__ void load2(const typename D::T* p, float& a, float& b);
template <> __device__ __forceinline__ void load2<DtBF16>(const u16* p, float& a, float& b) {
  u32 w = __ldg(reinterpret_cast<const u32*>(p)); a = __uint_as_float(w << 16); b = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void load2<DtF16>(const u16* p, float& a, float& b) {
  u32 w = __ldg(reinterpret_cast<const u32*>(p)); a = f16_to_f32((u16)(w & 0xffffu)); b = f16_to_f32((u16)(w >> 16));
}
template <> __device__ __forceinline__ void load2<DtF32>(const float* p, float& a, float& b) {
  float2 w = __ldg(reinterpret_cast<const float2*>(p)); a = w.x; b = w.y;
}

template <class D, int HD>
__device__ __forceinline__ void attn_split_impl(const typename D::T* __restrict__ q, const typename D::T* __restrict__ kc,
                                                const typename D::T* __restrict__ vc, float* __restrict__ part,
                                                const int* __restrict__ len_ptr, int len_add, int G, int max_len,
                                                float scale) {
  __shared__ float qs[ATT_GMAX * HD];
  __shared__ float sc[ATT_GMAX * ATT_CHUNK];
  const int h = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  const int len = min(*len_ptr + len_add, max_len);
  const int t0 = s * ATT_CHUNK;
  if (t0 >= len) return;  // the combine pass never reads this split
  const int n = min(ATT_CHUNK, len - t0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int NW = ATT_THREADS / 32;
  const float scale_r = D::rnd(scale);
  for (int i = tid; i < G * HD; i += ATT_THREADS)
    qs[i] = D::rnd(__fmul_rn(D::ld(q[(long long)h * G * HD + i]), scale_r));
  const typename D::T* kbase = kc + ((long long)h * max_len + t0) * HD;
  const typename D::T* vbase = vc + ((long long)h * max_len + t0) * HD;
  // Scores: LPR lanes per key row, 8 features per lane; IT row-iterations per warp.
  {
    const int LPR = HD / 8, RPW = 32 / LPR, IT = ATT_CHUNK / (NW * RPW);
    const int sub = lane / LPR, e0 = (lane % LPR) * 8;
    float kv[IT][8];
#pragma unroll
    for (int it = 0; it < IT; it++) {
      const int t = (it * NW + warp) * RPW + sub;
      if (t < n) load8<D>(kbase + (long long)t * HD + e0, kv[it]);
      else {
#pragma unroll
        for (int j = 0; j < 8; j++) kv[it][j] = 0.0f;
      }
    }
    __syncthreads();  // qs ready
    // g outer, rows inner: each q slice is read from shared memory once (2 x 16 B).
#pragma unroll
    for (int g = 0; g < ATT_GMAX; g++) {
      if (g < G) {
        const float4 qa = *reinterpret_cast<const float4*>(&qs[g * HD + e0]);
        const float4 qb = *reinterpret_cast<const float4*>(&qs[g * HD + e0 + 4]);
#pragma unroll
        for (int it = 0; it < IT; it++) {
          const int t = (it * NW + warp) * RPW + sub;
          float p = qa.x * kv[it][0];
          p = fmaf(qa.y, kv[it][1], p);
          p = fmaf(qa.z, kv[it][2], p);
          p = fmaf(qa.w, kv[it][3], p);
          p = fmaf(qb.x, kv[it][4], p);
          p = fmaf(qb.y, kv[it][5], p);
          p = fmaf(qb.z, kv[it][6], p);
          p = fmaf(qb.w, kv[it][7], p);
#pragma unroll
          for (int o = LPR / 2; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
          if ((lane % LPR) == 0 && t < n) sc[g * ATT_CHUNK + t] = p;
        }
      }
    }
  }
  // Issue this thread's V loads now; they land while the softmax runs.
  const int TPR = HD / 2, NG = ATT_THREADS / TPR, RPG = ATT_CHUNK / NG;
  const int grp = tid / TPR, d0 = (tid % TPR) * 2;
  float v0[RPG], v1[RPG];
#pragma unroll
  for (int i = 0; i < RPG; i++) {
    const int t = grp + NG * i;
    if (t < n) load2<D>(vbase + (long long)t * HD + d0, v0[i], v1[i]);
    else { v0[i] = 0.0f; v1[i] = 0.0f; }
  }
  __syncthreads();
  float* out = part + (((long long)h * S + s) * G) * (HD + 2);
  for (int g = warp; g < G; g += NW) {
    float m = -ZMLX_INF;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, sc[g * ATT_CHUNK + t]);
    m = warp_max(m);
    float l = 0.0f;
    for (int t = lane; t < ATT_CHUNK; t += 32) {
      float p = t < n ? mlx_exp(__fsub_rn(sc[g * ATT_CHUNK + t], m)) : 0.0f;
      sc[g * ATT_CHUNK + t] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) { out[g * (HD + 2) + HD] = m; out[g * (HD + 2) + HD + 1] = l; }
  }
  __syncthreads();
  float acc0[ATT_GMAX], acc1[ATT_GMAX];
#pragma unroll
  for (int g = 0; g < ATT_GMAX; g++) { acc0[g] = 0.0f; acc1[g] = 0.0f; }
#pragma unroll
  for (int i = 0; i < RPG; i++) {
    const int t = grp + NG * i;
#pragma unroll
    for (int g = 0; g < ATT_GMAX; g++) {
      if (g < G) {
        const float p = sc[g * ATT_CHUNK + t];  // 0 past n
        acc0[g] = fmaf(p, v0[i], acc0[g]);
        acc1[g] = fmaf(p, v1[i], acc1[g]);
      }
    }
  }
  // Deterministic cross-group sum: groups add into group 0's registers one at a time.
  for (int r = 1; r < NG; r++) {
    __syncthreads();
    if (grp == r) {
#pragma unroll
      for (int g = 0; g < ATT_GMAX; g++)
        if (g < G) { sc[g * HD + d0] = acc0[g]; sc[g * HD + d0 + 1] = acc1[g]; }
    }
    __syncthreads();
    if (grp == 0) {
#pragma unroll
      for (int g = 0; g < ATT_GMAX; g++)
        if (g < G) { acc0[g] += sc[g * HD + d0]; acc1[g] += sc[g * HD + d0 + 1]; }
    }
  }
  if (grp == 0) {
#pragma unroll
    for (int g = 0; g < ATT_GMAX; g++)
      if (g < G) { out[g * (HD + 2) + d0] = acc0[g]; out[g * (HD + 2) + d0 + 1] = acc1[g]; }
  }
}

// Pass 2: merge the splits of each query head; out = r(sum_s w_s o_s / sum_s w_s l_s),
// w_s = exp(m_s - max_s m_s). One block (256 threads) per q head: split weights computed
// in parallel into shared memory, then NSUB thread groups sum disjoint split subsets
// (independent loads in flight) and are added in a fixed order (deterministic).
#define ATT_MAX_SPLITS 2048
template <class D, int HD>
__device__ __forceinline__ void attn_combine_impl(const float* __restrict__ part, typename D::T* __restrict__ y,
                                                  const int* __restrict__ len_ptr, int len_add, int G, int S, int max_len) {
  __shared__ float wsm[ATT_MAX_SPLITS];
  __shared__ float red[32];
  __shared__ float acc_s[256];
  const int hq = blockIdx.x, h = hq / G, g = hq - h * G;
  const int len = min(*len_ptr + len_add, max_len);
  const int used = min((len + ATT_CHUNK - 1) / ATT_CHUNK, ATT_MAX_SPLITS);
  const float* p = part + ((long long)h * S * G + g) * (HD + 2);
  const long long st = (long long)G * (HD + 2);
  float m = -ZMLX_INF;
  for (int s = threadIdx.x; s < used; s += blockDim.x) m = fmaxf(m, p[s * st + HD]);
  m = block_max(m, red);
  float den = 0.0f;
  for (int s = threadIdx.x; s < used; s += blockDim.x) {
    const float w = mlx_exp(__fsub_rn(p[s * st + HD], m));
    wsm[s] = w;
    den = fmaf(w, p[s * st + HD + 1], den);
  }
  den = block_sum(den, red);  // ends with barriers: wsm visible
  const int NSUB = 256 / HD, d = threadIdx.x % HD, sub = threadIdx.x / HD;
  float num = 0.0f;
  if (sub < NSUB) {
    int s = sub;
    for (; s + 3 * NSUB < used; s += 4 * NSUB) {
      const float a0 = p[s * st + d], a1 = p[(s + NSUB) * st + d], a2 = p[(s + 2 * NSUB) * st + d], a3 = p[(s + 3 * NSUB) * st + d];
      num = fmaf(wsm[s], a0, num);
      num = fmaf(wsm[s + NSUB], a1, num);
      num = fmaf(wsm[s + 2 * NSUB], a2, num);
      num = fmaf(wsm[s + 3 * NSUB], a3, num);
    }
    for (; s < used; s += NSUB) num = fmaf(wsm[s], p[s * st + d], num);
    acc_s[threadIdx.x] = num;
  }
  __syncthreads();
  if (sub == 0) {
    for (int r = 1; r < NSUB; r++) num += acc_s[r * HD + d];
    y[(long long)hq * HD + d] = D::st(__fdiv_rn(num, den));
  }
}

// Router: softmax (f32, MLX exp, tree-order sum, times 1/sum) over E logits per row,
// optionally rounded to the dtype (MLX `softmax(precise=True)` returns the dtype),
// then top-k by value (ties -> lower index), listed in descending order, then optional
// renormalisation (sum of the k weights accumulated in the dtype, then w / sum rounded).
// Weights are written as f32 (values exact in the dtype when round_probs != 0).
template <class D>
__device__ __forceinline__ void softmax_topk_impl(const typename D::T* __restrict__ logits, u32* __restrict__ ids,
                                                  float* __restrict__ wout, int E, int k, int round_probs, int renorm) {
  extern __shared__ float pr[];  // E floats; one warp per row (blockDim.x == 32)
  __shared__ float topw[64];
  const int lane = threadIdx.x;
  logits += (long long)blockIdx.x * E;
  ids += (long long)blockIdx.x * k;
  wout += (long long)blockIdx.x * k;
  float m = -ZMLX_INF;
  for (int i = lane; i < E; i += 32) { float v = D::ld(logits[i]); pr[i] = v; m = fmaxf(m, v); }
  m = warp_max(m);
  float sum = 0.0f;
  for (int i = lane; i < E; i += 32) { float e = mlx_exp(__fsub_rn(pr[i], m)); pr[i] = e; sum += e; }
  sum = warp_sum(sum);
  const float inv = __fdiv_rn(1.0f, sum);
  for (int i = lane; i < E; i += 32) {
    float p = __fmul_rn(pr[i], inv);
    pr[i] = round_probs ? D::rnd(p) : p;
  }
  __syncwarp();
  for (int j = 0; j < k; j++) {
    float bv = -ZMLX_INF;
    int bi = 0x7fffffff;
    for (int i = lane; i < E; i += 32) {
      float v = pr[i];
      if (v > bv) { bv = v; bi = i; }  // ascending i: first max kept
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { ids[j] = (u32)bi; topw[j] = bv; pr[bi] = -ZMLX_INF; }
    __syncwarp();
  }
  if (lane == 0) {
    if (renorm) {
      float s = 0.0f;
      for (int j = 0; j < k; j++) s = round_probs ? D::rnd(__fadd_rn(s, topw[j])) : __fadd_rn(s, topw[j]);
      for (int j = 0; j < k; j++) { float v = __fdiv_rn(topw[j], s); wout[j] = round_probs ? D::rnd(v) : v; }
    } else {
      for (int j = 0; j < k; j++) wout[j] = topw[j];
    }
  }
}

// Weighted sum of k expert outputs y [k, n] with f32 weights w [k] (exact in the dtype):
// acc = r(w0*y0); acc = r(acc + r(wi*yi)) in list order (MLX: multiply, then a sum over
// the k axis that accumulates in the dtype).
template <class D>
__device__ __forceinline__ void moe_combine_impl(const typename D::T* __restrict__ y, const float* __restrict__ w,
                                                 typename D::T* __restrict__ out, int k, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = 0.0f;
  for (int j = 0; j < k; j++) acc = D::rnd(__fadd_rn(acc, D::rnd(__fmul_rn(w[j], D::ld(y[(long long)j * n + i])))));
  out[i] = D::st(acc);
}

// swiglu: MLX sigmoid (e = r(exp|x|), y = 1/(1+e), s = r(x<0 ? y : 1-y)), silu = r(g*s), out = r(silu*u).
template <class D>
__device__ __forceinline__ void swiglu_impl(const typename D::T* __restrict__ g, const typename D::T* __restrict__ u,
                                            typename D::T* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gv = D::ld(g[i]);
  const float e = D::rnd(mlx_exp(fabsf(gv)));
  const float yv = __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
  const float s = D::rnd(gv < 0.0f ? yv : __fsub_rn(1.0f, yv));
  const float silu = D::rnd(__fmul_rn(gv, s));
  out[i] = D::st(__fmul_rn(silu, D::ld(u[i])));
}

template <class D>
__device__ __forceinline__ void add_impl(const typename D::T* a, const typename D::T* b, typename D::T* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = D::st(__fadd_rn(D::ld(a[i]), D::ld(b[i])));
}

// Quantized embedding row: out[d] = r(r(s*q) + b) (MLX dequantize), row id read from device.
template <class D>
__device__ __forceinline__ void embed_impl(const u32* __restrict__ w, const typename D::T* __restrict__ scales,
                                           const typename D::T* __restrict__ biases, const u32* __restrict__ id_ptr,
                                           typename D::T* __restrict__ out, int dim, int bits, int gs) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= dim) return;
  const long long row = *id_ptr;
  const long long wpr = (long long)dim * bits / 32;
  const u32* wr = w + row * wpr;
  const int bp = d * bits, wi = bp >> 5, off = bp & 31;
  u32 v = wr[wi] >> off;
  if (off + bits > 32) v |= wr[wi + 1] << (32 - off);
  v &= (1u << bits) - 1u;
  const long long gi = row * (dim / gs) + d / gs;
  const float sq = D::rnd(__fmul_rn(D::ld(scales[gi]), (float)v));
  out[d] = D::st(__fadd_rn(sq, D::ld(biases[gi])));
}

// argmax over n values; first index of the maximum; NaN never wins. Many blocks: each
// folds its best into ws[0] with a 64-bit atomicMax on (order-preserving value bits << 32 |
// ~index); the last block to finish (ws[1] counter) writes the index and resets ws to 0,
// so the same workspace serves the next call (and graph replays). ws must start zeroed.
__device__ __forceinline__ u32 ordered_bits(float v) {
  u32 u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
template <class D>
__device__ __forceinline__ void argmax_impl(const typename D::T* __restrict__ x, u32* __restrict__ out,
                                            u64* __restrict__ ws, int n) {
  __shared__ u64 rk[32];
  __shared__ bool last;
  u64 best = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = D::ld(x[i]);
    if (v == v) {
      u64 key = ((u64)ordered_bits(v) << 32) | (u64)(~(u32)i);
      best = key > best ? key : best;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    u64 ob = __shfl_xor_sync(0xffffffffu, best, o);
    best = ob > best ? ob : best;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) rk[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nw; w++) best = rk[w] > best ? rk[w] : best;
    atomicMax(ws, best);
    __threadfence();
    const u64 done = atomicAdd(ws + 1, 1ull);
    last = (done == gridDim.x - 1);
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    const u64 k = atomicAdd(ws, 0ull);
    *out = k == 0 ? 0u : ~(u32)(k & 0xffffffffull);
    ws[0] = 0;
    ws[1] = 0;
  }
}

// Vectorized device copy (16 bytes per thread per step), for the bandwidth baseline.
extern "C" __global__ void copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst, long long n16) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x)
    dst[i] = __ldg(src + i);
}

#define ZMLX_OPS(DT, DN)                                                                                       \
  extern "C" __global__ void rms_norm_##DN(const DT::T* x, const DT::T* w, DT::T* y, int n, float eps,         \
                                           float inv_n) { rms_norm_impl<DT>(x, w, y, n, eps, inv_n); }         \
  extern "C" __global__ void rope_##DN(const DT::T* x, DT::T* y, const int* pos, int pos_add, int rows, int hd, \
                                       int dims, float step, float scale) {                                    \
    rope_impl<DT>(x, y, pos, pos_add, rows, hd, dims, step, scale);                                            \
  }                                                                                                            \
  extern "C" __global__ void kv_append_##DN(const DT::T* k, const DT::T* v, DT::T* kc, DT::T* vc,             \
                                            const int* pos, int pos_add, int n_kv, int max_len, int hd) {      \
    kv_append_impl<DT>(k, v, kc, vc, pos, pos_add, n_kv, max_len, hd);                                         \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_split_##DN##_d64(                            \
      const DT::T* q, const DT::T* kc, const DT::T* vc, float* part, const int* len, int len_add, int G,       \
      int max_len, float scale) { attn_split_impl<DT, 64>(q, kc, vc, part, len, len_add, G, max_len, scale); } \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_split_##DN##_d128(                           \
      const DT::T* q, const DT::T* kc, const DT::T* vc, float* part, const int* len, int len_add, int G,       \
      int max_len, float scale) { attn_split_impl<DT, 128>(q, kc, vc, part, len, len_add, G, max_len, scale); }\
  extern "C" __global__ void attn_combine_##DN##_d64(const float* part, DT::T* y, const int* len, int len_add,  \
                                                     int G, int S, int max_len) {                              \
    attn_combine_impl<DT, 64>(part, y, len, len_add, G, S, max_len);                                           \
  }                                                                                                            \
  extern "C" __global__ void attn_combine_##DN##_d128(const float* part, DT::T* y, const int* len, int len_add, \
                                                      int G, int S, int max_len) {                             \
    attn_combine_impl<DT, 128>(part, y, len, len_add, G, S, max_len);                                          \
  }                                                                                                            \
  extern "C" __global__ void softmax_topk_##DN(const DT::T* logits, u32* ids, float* w, int E, int k,          \
                                               int round_probs, int renorm) {                                  \
    softmax_topk_impl<DT>(logits, ids, w, E, k, round_probs, renorm);                                          \
  }                                                                                                            \
  extern "C" __global__ void moe_combine_##DN(const DT::T* y, const float* w, DT::T* out, int k, int n) {      \
    moe_combine_impl<DT>(y, w, out, k, n);                                                                     \
  }                                                                                                            \
  extern "C" __global__ void swiglu_##DN(const DT::T* g, const DT::T* u, DT::T* out, int n) {                  \
    swiglu_impl<DT>(g, u, out, n);                                                                             \
  }                                                                                                            \
  extern "C" __global__ void add_##DN(const DT::T* a, const DT::T* b, DT::T* out, int n) {                     \
    add_impl<DT>(a, b, out, n);                                                                                \
  }                                                                                                            \
  extern "C" __global__ void embed_##DN(const u32* w, const DT::T* s, const DT::T* b, const u32* id,           \
                                        DT::T* out, int dim, int bits, int gs) {                               \
    embed_impl<DT>(w, s, b, id, out, dim, bits, gs);                                                           \
  }                                                                                                            \
  extern "C" __global__ void argmax_##DN(const DT::T* x, u32* out, u64* ws, int n) { argmax_impl<DT>(x, out, ws, n); }
