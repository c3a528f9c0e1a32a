// Decode-step kernels other than the quantized matmuls. Rounding contracts are in
// docs/kernels.md; every op whose MLX counterpart rounds to the dtype rounds here too.

// rms_norm over rows of length n: f32 sum of squares (tree order), mean = sum * inv_n,
// r = 1/sqrt(mean + eps), out = r(r(x*r) * w).
// The register path (n <= 8 * blockDim.x; the launcher's thread count makes it the path for
// n <= 8192): thread t holds v[j] = x[t + j*nt], j < 8 (0 past n); out[j] gets the f32 value
// before the final rounding (stored as D::st(out[j])). Shared with add_rms_norm (whose v is
// r(x + delta)) and moe_gating's prologue, so their outputs are bitwise this kernel's when
// launched with the same thread count.
template <class D> __device__ __forceinline__ void rms_norm_load8(const typename D::T* p, int n, float* out) {
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    out[j] = i < n ? D::ld(p[i]) : 0.0f;
  }
}
// The arithmetic, from the thread's values v and weights wv (rms_norm_load8 layout).
template <class D>
__device__ __forceinline__ void rms_norm_vals_w(const float* v, const float* wv, int n, float eps, float inv_n,
                                                float* red, float* out) {
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; j++) ss = fmaf(v[j], v[j], ss);
  ss = block_sum(ss, red);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
#pragma unroll
  for (int j = 0; j < 8; j++) out[j] = __fmul_rn(D::rnd(__fmul_rn(v[j], r)), wv[j]);
}
template <class D>
__device__ __forceinline__ void rms_norm_vals(const float* v, const typename D::T* __restrict__ w, int n, float eps,
                                              float inv_n, float* red, float* out) {
  float wv[8];
  rms_norm_load8<D>(w, n, wv);
  rms_norm_vals_w<D>(v, wv, n, eps, inv_n, red, out);
}
template <class D>
__device__ __forceinline__ void rms_norm_regs(const typename D::T* __restrict__ x, const typename D::T* __restrict__ w,
                                              int n, float eps, float inv_n, float* red, float* out) {
  float v[8];
  rms_norm_load8<D>(x, n, v);
  rms_norm_vals<D>(v, w, n, eps, inv_n, red, out);
}
template <class D>
__device__ __forceinline__ void rms_norm_impl(const typename D::T* x, const typename D::T* __restrict__ w,
                                              typename D::T* __restrict__ y, int n, float eps, float inv_n) {
  __shared__ float red[32];
  x += (long long)blockIdx.x * n;
  y += (long long)blockIdx.x * n;
  const int nt = blockDim.x;
  if (n <= 8 * nt) {  // all loads in flight at once, values stay in registers
    // The weights (constant) are requested before the dependency wait, x after it.
    float wv[8], v[8], out[8];
#ifdef ZMLX_NORM_W_AFTER
    ZMLX_GRID_DEP();
#endif
    rms_norm_load8<D>(w, n, wv);
#ifndef ZMLX_NORM_W_AFTER
    ZMLX_GRID_DEP();
#endif
    rms_norm_load8<D>(x, n, v);
    rms_norm_vals_w<D>(v, wv, n, eps, inv_n, red, out);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * nt;
      if (i < n) y[i] = D::st(out[j]);
    }
    return;
  }
  ZMLX_GRID_DEP();
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
__device__ __forceinline__ void kv_append_impl(const typename D::T* k, const typename D::T* v,
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

#define ATT_THREADS 256
// Rows per split of the split single kernel: ⌈len/splits⌉ rounded up to 32 (at least 32).
__device__ __forceinline__ int attn_rows_per_split(int len, int splits) {
  const int r = (len + splits - 1) / splits;
  return max(32, (r + 31) / 32 * 32);
}
// Load 4 consecutive values (one 8-byte load for 16-bit dtypes).
template <class D> __device__ __forceinline__ void load4(const typename D::T* p, float* o);
template <> __device__ __forceinline__ void load4<DtBF16>(const u16* p, float* o) {
  uint2 w = ld_act8(p);
  o[0] = __uint_as_float(w.x << 16); o[1] = __uint_as_float(w.x & 0xffff0000u);
  o[2] = __uint_as_float(w.y << 16); o[3] = __uint_as_float(w.y & 0xffff0000u);
}
template <> __device__ __forceinline__ void load4<DtF16>(const u16* p, float* o) {
  uint2 w = ld_act8(p);
  o[0] = f16_to_f32((u16)(w.x & 0xffffu)); o[1] = f16_to_f32((u16)(w.x >> 16));
  o[2] = f16_to_f32((u16)(w.y & 0xffffu)); o[3] = f16_to_f32((u16)(w.y >> 16));
}
template <> __device__ __forceinline__ void load4<DtF32>(const float* p, float* o) {
  const uint4 w = ld_act16(p);
  o[0] = __uint_as_float(w.x); o[1] = __uint_as_float(w.y); o[2] = __uint_as_float(w.z); o[3] = __uint_as_float(w.w);
}

// Long-context flash-decoding attention (chosen above ATT_SINGLE_MAX_LEN), pass 1. Block (kv head h, split s) covers positions
// [s*CHUNK, min((s+1)*CHUNK, len)) for the G query heads of h (GQA: q head i uses kv head
// i / G). q is first scaled MLX-style: r(q * r(scale)). Scores and softmax in f32 (MLX exp),
// partial output o = sum_t p_t v_t in f32. Writes [G][HD + 2] floats: o, max, sum.
// All of a thread's K loads are issued before their first use; 16-bit V rows are copied into
// shared memory before them (f32 V: register loads after the scores), so a block waits on
// memory about once (twice for f32), not once per row.
#define ATT_CHUNK 128
#define ATT_GMAX 16
template <class D> __device__ __forceinline__ void load2(const typename D::T* p, float& a, float& b);
template <> __device__ __forceinline__ void load2<DtBF16>(const u16* p, float& a, float& b) {
  u32 w = ld_act4(p); a = __uint_as_float(w << 16); b = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void load2<DtF16>(const u16* p, float& a, float& b) {
  u32 w = ld_act4(p); a = f16_to_f32((u16)(w & 0xffffu)); b = f16_to_f32((u16)(w >> 16));
}
template <> __device__ __forceinline__ void load2<DtF32>(const float* p, float& a, float& b) {
  const uint2 w = ld_act8(p); a = __uint_as_float(w.x); b = __uint_as_float(w.y);
}

template <class D, int HD>
__device__ __forceinline__ void attn_split_long_impl(const typename D::T* q, const typename D::T* __restrict__ kc,
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
  // Programmatic dependent launch: a block without the newest row (len - 1, written by the
  // previous kernel) loads its K and V rows (earlier steps') before the dependency wait; q,
  // from the previous kernel, after it. Same values either way.
#ifdef ZMLX_ATT_NO_EARLY
  const bool early = false;
#else
  const bool early = t0 + n < len;
#endif
  if (!early) ZMLX_GRID_DEP();
  const typename D::T* kbase = kc + ((long long)h * max_len + t0) * HD;
  const typename D::T* vbase = vc + ((long long)h * max_len + t0) * HD;
  // 16-bit dtypes: the chunk's V rows are copied into shared memory (cp.async, rows past n
  // zero-filled) before the K loads, so the V round trip overlaps the scores; f32 V (twice
  // the bytes) stays on register loads below.
  constexpr bool VSM = sizeof(typename D::T) == 2;
  __shared__ __align__(16) typename D::T vs[VSM ? ATT_CHUNK * HD : 8];
  if constexpr (VSM) {
    constexpr int U = HD * 2 / 16;  // 16-byte units per row
    for (int i = tid; i < ATT_CHUNK * U; i += ATT_THREADS) {
      const int t = i / U, u = i % U;
      cp_async16_zfill(reinterpret_cast<uint4*>(vs + t * HD) + u, reinterpret_cast<const uint4*>(vbase + (long long)(t < n ? t : 0) * HD) + u, t < n);
    }
  }
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
    if (early) ZMLX_GRID_DEP();
    for (int i = tid; i < G * HD; i += ATT_THREADS)
      qs[i] = D::rnd(__fmul_rn(D::ld(q[(long long)h * G * HD + i]), scale_r));
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
  // f32: issue this thread's V loads now; they land while the softmax runs.
  const int TPR = HD / 2, NG = ATT_THREADS / TPR, RPG = ATT_CHUNK / NG;
  const int grp = tid / TPR, d0 = (tid % TPR) * 2;
  float v0[VSM ? 1 : RPG], v1[VSM ? 1 : RPG];
  if constexpr (!VSM) {
#pragma unroll
    for (int i = 0; i < RPG; i++) {
      const int t = grp + NG * i;
      if (t < n) load2<D>(vbase + (long long)t * HD + d0, v0[i], v1[i]);
      else { v0[i] = 0.0f; v1[i] = 0.0f; }
    }
  }
  if constexpr (VSM) cp_async_wait_all();
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
    float va, vb;  // the same values load2 gives (0 past n)
    if constexpr (VSM) {
      va = D::ld(vs[t * HD + d0]);
      vb = D::ld(vs[t * HD + d0 + 1]);
    } else {
      va = v0[i];
      vb = v1[i];
    }
#pragma unroll
    for (int g = 0; g < ATT_GMAX; g++) {
      if (g < G) {
        const float p = sc[g * ATT_CHUNK + t];  // 0 past n
        acc0[g] = fmaf(p, va, acc0[g]);
        acc1[g] = fmaf(p, vb, acc1[g]);
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


// Pass 2 of the Long and Split attentions: merge up to ATT_MAX_SPLITS partials per query head
// (o relative to its split's max, max, sum) with weights exp(max_s - max).
#define ATT_MAX_SPLITS 2048
template <class D, int HD>
__device__ __forceinline__ void attn_combine_long_impl(const float* part, typename D::T* __restrict__ y,
                                                  const int* __restrict__ len_ptr, int len_add, int G, int S, int max_len,
                                                  int chunk) {
  __shared__ float wsm[ATT_MAX_SPLITS];
  __shared__ float red[32];
  __shared__ float acc_s[256];
  const int hq = blockIdx.x, h = hq / G, g = hq - h * G;
  const int len = min(*len_ptr + len_add, max_len);
  // Rows per split: fixed (the long kernel's ATT_CHUNK) or, chunk == 0, the split single
  // kernel's attn_rows_per_split(len, S).
  const int rps = chunk > 0 ? chunk : attn_rows_per_split(len, S);
  const int used = min((len + rps - 1) / rps, ATT_MAX_SPLITS);
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
  // out = r(sum_s w_s o_s / den): the splits summed by NSUB thread groups (4 independent
  // loads in flight), the groups added in fixed order.
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

// Decode attention by query head (AttnKernel::Single / Split): one block per query head
// (Single: one launch, no workspace) or per (query head, split) walks its rows in chunks of
// ATS_CH rows; splits write partials for attn_combine_long. Per chunk: scores with one thread
// per row (q·k in feature order, q from shared memory, all of the row's loads issued first),
// the chunk max against the running
// max, p = MLX exp(s - max) and their block sum, then P·V by row streams (LPR lanes × FPL
// features per row; stream s takes rows ≡ s mod NSTR), the accumulators rescaled by
// exp(old max - new max) when a later chunk raises the max (online softmax across chunks).
// Streams are added in fixed order; out = r(num / den). Correct for any length ≤ max_len;
// the host picks it where it is fastest (AttnKernel::for_len).
// Programmatic dependent launch: the rows below the newest (len - 1) were written by earlier
// steps, so 16-bit caches have them requested before the dependency wait (the previous kernel,
// or this kernel's prologue, writes q and row len - 1): each thread's first K row into
// registers, the first ATS_VROWS V rows into shared memory (cp.async). They are the values the
// loads after the wait would return, so the arithmetic and results are unchanged. Rows below
// len - 1 must therefore not be written by the kernel launched just before this one.
#define ATS_CH 512
#define ATS_VROWS 128
template <class D, int N> __device__ __forceinline__ void load_n(const typename D::T* p, float* o) {
  if constexpr (N == 4) load4<D>(p, o);
  else if constexpr (N == 2) load2<D>(p, o[0], o[1]);
  else o[0] = D::ld(p[0]);
}
// One head row through RMSNorm and RoPE by one warp (qk_norm_rope_append's arithmetic, below):
// buf (hd floats of shared memory) takes the normalised row; emit(i, o1, o2) gets the
// rotated pair (dtype-exact floats) of features i and i + hd/2.
template <class D, class Emit>
__device__ __forceinline__ void norm_rope_row(const typename D::T* x, const typename D::T* __restrict__ w, int hd,
                                              float eps, float inv_n, int pos, float step, float scale, float* buf,
                                              int lane, const Emit& emit) {
  float vv[8], wv[8];
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = lane + j * 32;
    vv[j] = i < hd ? D::ld(x[i]) : 0.0f;
    wv[j] = i < hd ? D::ld(w[i]) : 0.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; j++) ss = fmaf(vv[j], vv[j], ss);
  ss = warp_sum(ss);
  ss = warp_sum(lane == 0 ? ss : 0.0f);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int i = lane + j * 32;
    if (i < hd) buf[i] = D::rnd(__fmul_rn(D::rnd(__fmul_rn(vv[j], r)), wv[j]));
  }
  __syncwarp();
  const int half = hd >> 1;
  for (int i = lane; i < half; i += 32) {
    const float inv = mlx_exp(__fmul_rn(-(float)i, step));
    const float theta = __fmul_rn(__fmul_rn((float)pos, scale), inv);
    const float c = D::rnd(mlx_cos(theta)), s = D::rnd(mlx_sin(theta));
    const float x1 = buf[i], x2 = buf[i + half];
    const float o1 = D::rnd(__fsub_rn(D::rnd(__fmul_rn(x1, c)), D::rnd(__fmul_rn(x2, s))));
    const float o2 = D::rnd(__fadd_rn(D::rnd(__fmul_rn(x1, s)), D::rnd(__fmul_rn(x2, c))));
    emit(i, o1, o2);
  }
}
// The qk_norm_rope prologue of the fused attention (qk_norm_rope_append's arithmetic): q, k
// and v are the projections of the new token at position len - 1, un-normalised. Each block
// normalises and rotates its q head; the blocks whose rows hold the new position also do its
// k head and take its v row, keep both in shared memory for their own use (rows the kernel
// writes are never read back through the caches) and append them to the caches.
template <class D> struct QkPrologue {
  const typename D::T *k, *v, *qw, *kw;
  typename D::T *kc_out, *vc_out;
  float eps, inv_n, step;
};

// PRO: the qk_norm_rope prologue (`pro` non-null); without it the prologue's shared buffers
// shrink to one float each.
template <class D, int HD, bool PRO = false>
__device__ __forceinline__ void attn_single_impl(const typename D::T* q, const typename D::T* __restrict__ kc,
                                                 const typename D::T* __restrict__ vc, typename D::T* __restrict__ y,
                                                 float* __restrict__ part, const int* __restrict__ len_ptr, int len_add,
                                                 int G, int max_len, float scale, const QkPrologue<D>* pro = nullptr) {
  constexpr int FPL = HD >= 128 ? 4 : (HD >= 64 ? 2 : 1);
  constexpr int LPR = HD / FPL, RPW = 32 / LPR, NSTR = (ATT_THREADS / 32) * RPW;
  __shared__ float qs[HD];
  __shared__ float sc[ATS_CH];
  __shared__ float red[32];
  __shared__ float accs[NSTR * HD];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int hq = blockIdx.x, h = hq / G;
  const float scale_r = D::rnd(scale);
  const int len = min(*len_ptr + len_add, max_len);
  // Split over gridDim.y blocks per head: rows [r0, r1) (attn_rows_per_split; blocks past the
  // length exit, the combine never reads them).
  const int S = gridDim.y, split = blockIdx.y;
  const int rps = S == 1 ? len : attn_rows_per_split(len, S);
  const int r0 = split * rps, r1 = min(len, r0 + rps);
  if (S > 1 && r0 >= len) return;
  const typename D::T* kb = kc + ((long long)h * max_len + r0) * HD;
  const typename D::T* vb = vc + ((long long)h * max_len + r0) * HD;
#ifdef ZMLX_ATT_NO_EARLY
  constexpr bool EARLY = false;
#else
  constexpr bool EARLY = sizeof(typename D::T) == 2;
#endif
  constexpr int KC = HD < 64 ? HD : 64;   // K features loaded at once (registers)
  constexpr int KW = EARLY ? KC / 8 : 1;  // 16-byte words of a K row's first KC features
  __shared__ __align__(16) typename D::T vst[EARLY ? ATS_VROWS * HD : 8];
  const int nold = EARLY ? max(0, min(r1, len - 1) - r0) : 0;  // rows [0, nold) predate this step
  const bool kpre = tid < min(nold, ATS_CH);
  const int nvs = min(nold, ATS_VROWS);
  uint4 kraw[KW];
  if (kpre) {
#pragma unroll
    for (int u = 0; u < KW; u++) kraw[u] = ld_act16(kb + (long long)tid * HD + 8 * u);
  }
  for (int i = tid; i < nvs * (HD / 8); i += ATT_THREADS) cp_async16(vst + 8 * i, vb + 8 * i);
  ZMLX_GRID_DEP();
  constexpr int PHD = PRO ? HD : 1;
  __shared__ float knew[PHD], vnew[PHD], nbuf[2][PHD];
  int pnew = -1;  // the new position's row within [r0, r1) when the prologue provides it
  if constexpr (!PRO) {
    for (int i = tid; i < HD; i += ATT_THREADS) qs[i] = D::rnd(__fmul_rn(D::ld(q[(long long)hq * HD + i]), scale_r));
  } else {
    const int pos = *len_ptr + len_add - 1, half = HD / 2;
    const bool mine = pos >= r0 && pos < r1;
    const long long co = ((long long)h * max_len + pos) * HD;
    if (warp == 0) {
      norm_rope_row<D>(q + (long long)hq * HD, pro->qw, HD, pro->eps, pro->inv_n, pos, pro->step, 1.0f, nbuf[0], lane,
                       [&](int i, float o1, float o2) {
                         qs[i] = D::rnd(__fmul_rn(o1, scale_r));
                         qs[i + half] = D::rnd(__fmul_rn(o2, scale_r));
                       });
    } else if (warp == 1 && mine) {
      norm_rope_row<D>(pro->k + (long long)h * HD, pro->kw, HD, pro->eps, pro->inv_n, pos, pro->step, 1.0f, nbuf[1], lane,
                       [&](int i, float o1, float o2) {
                         knew[i] = o1;
                         knew[i + half] = o2;
                         pro->kc_out[co + i] = D::st(o1);
                         pro->kc_out[co + i + half] = D::st(o2);
                       });
    } else if (warp == 2 && mine) {
      for (int i = lane; i < HD; i += 32) {
        const typename D::T t = pro->v[(long long)h * HD + i];
        vnew[i] = D::ld(t);
        pro->vc_out[co + i] = t;
      }
    }
    if (mine) pnew = pos - r0;
  }
  const int nrows = r1 - r0;
  const int stream = warp * RPW + lane / LPR, f0 = (lane % LPR) * FPL;
  float acc[FPL];
#pragma unroll
  for (int i = 0; i < FPL; i++) acc[i] = 0.0f;
  float m_run = -ZMLX_INF, l_run = 0.0f;
  __syncthreads();  // qs ready
  for (int c0 = 0; c0 < nrows; c0 += ATS_CH) {
    const int n = min(ATS_CH, nrows - c0);
    float cmax = -ZMLX_INF;
    for (int t = tid; t < n; t += ATT_THREADS) {
      const typename D::T* kr = kb + (long long)(c0 + t) * HD;
      float s = 0.0f;
      if (PRO && c0 + t == pnew) {  // the prologue's row, same products in the same order
        for (int e = 0; e < PHD; e++) s = fmaf(qs[e], knew[e], s);
      } else {
        const bool pre = EARLY && c0 == 0 && t == tid && kpre;  // first KC features loaded before the wait
#pragma unroll
        for (int e0 = 0; e0 < HD; e0 += KC) {
          float kv[KC];
          if (pre && e0 == 0) {
#pragma unroll
            for (int u = 0; u < KW; u++) unpack8<D>(kraw[u], kv + 8 * u);
          } else {
#pragma unroll
            for (int e = 0; e < KC; e += 8) load8<D>(kr + e0 + e, kv + e);
          }
#pragma unroll
          for (int e = 0; e < KC; e++) s = fmaf(qs[e0 + e], kv[e], s);
        }
      }
      sc[t] = s;
      cmax = fmaxf(cmax, s);
    }
    if (EARLY && c0 == 0) cp_async_wait_all();  // the staged V rows, published by block_max's barriers
    const float m_new = fmaxf(m_run, block_max(cmax, red));  // its barriers publish sc
    const float alpha = mlx_exp(__fsub_rn(m_run, m_new));     // 0 on the first chunk
    float lsum = 0.0f;
    for (int t = tid; t < n; t += ATT_THREADS) {
      const float p = mlx_exp(__fsub_rn(sc[t], m_new));
      sc[t] = p;
      lsum += p;
    }
    l_run = fmaf(l_run, alpha, block_sum(lsum, red));  // its barriers publish p
#pragma unroll
    for (int i = 0; i < FPL; i++) acc[i] = __fmul_rn(acc[i], alpha);
#pragma unroll 16
    for (int t = stream; t < n; t += NSTR) {
      float v[FPL];
      if (PRO && c0 + t == pnew) {
#pragma unroll
        for (int i = 0; i < FPL; i++) v[i] = vnew[PRO ? f0 + i : 0];
      } else if (EARLY && c0 == 0 && t < nvs) {
#pragma unroll
        for (int i = 0; i < FPL; i++) v[i] = D::ld(vst[t * HD + f0 + i]);
      } else {
        load_n<D, FPL>(vb + (long long)(c0 + t) * HD + f0, v);
      }
      const float p = sc[t];
#pragma unroll
      for (int i = 0; i < FPL; i++) acc[i] = fmaf(p, v[i], acc[i]);
    }
    m_run = m_new;
    __syncthreads();  // sc is rewritten by the next chunk
  }
#pragma unroll
  for (int i = 0; i < FPL; i++) accs[stream * HD + f0 + i] = acc[i];
  __syncthreads();
  // One block per head: the output. Split: the partial (o relative to the split's max, max,
  // sum) in attn_split_long's layout [kv head][split][G][HD + 2], for attn_combine_long.
  float* out = S > 1 ? part + (((long long)h * S + split) * G + (hq - h * G)) * (HD + 2) : nullptr;
  for (int d = tid; d < HD; d += ATT_THREADS) {
    float num = 0.0f;
    for (int s = 0; s < NSTR; s++) num += accs[s * HD + d];
    if (S == 1) y[(long long)hq * HD + d] = D::st(__fdiv_rn(num, l_run));
    else out[d] = num;
  }
  if (S > 1 && tid == 0) { out[HD] = m_run; out[HD + 1] = l_run; }
}

// Sequential f32 sum of p[0..n) (MLX's CPU softmax order): loads batched 8 at a time, adds in order.
__device__ __forceinline__ float seq_sum_f32(const float* p, int n) {
  float sum = 0.0f;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    float t[8];
#pragma unroll
    for (int j = 0; j < 8; j++) t[j] = p[i + j];
#pragma unroll
    for (int j = 0; j < 8; j++) sum = __fadd_rn(sum, t[j]);
  }
  for (; i < n; i++) sum = __fadd_rn(sum, p[i]);
  return sum;
}

// Router, as mlx-lm's Qwen3 MoE: p = softmax(precise=True) over E logits per row (f32
// max, MLX exp, ONE f32 accumulator summed in element order from 0 like MLX's CPU
// softmax, times r32(1/sum)), rounded to the dtype when round_probs (MLX returns the
// dtype); top-k by value (ties -> lower index), listed by descending value; optional
// renormalisation w = r(p / r(sum_f32 p)), the k values summed in f32 in list order and
// rounded once (MLX 0.32.4 sums bf16/f16 in f32). MLX's argpartition order is not
// reproduced: the renorm sum can differ from MLX's only when the f32 sum of the k values
// is inexact (their magnitudes span more than ~2^13). Weights are written as f32
// (exact in the dtype when round_probs != 0).
template <class D>
__device__ __forceinline__ void softmax_topk_impl(const typename D::T* logits, u32* __restrict__ ids,
                                                  float* __restrict__ wout, int E, int k, int round_probs, int renorm) {
  extern __shared__ float pr[];  // E floats; one warp per row (blockDim.x == 32)
  __shared__ float topw[64];
  __shared__ float inv_sh;
  const int lane = threadIdx.x;
  logits += (long long)blockIdx.x * E;
  ids += (long long)blockIdx.x * k;
  wout += (long long)blockIdx.x * k;
  float m = -ZMLX_INF;
  for (int i = lane; i < E; i += 32) { float v = D::ld(logits[i]); pr[i] = v; m = fmaxf(m, v); }
  m = warp_max(m);
  for (int i = lane; i < E; i += 32) pr[i] = mlx_exp(__fsub_rn(pr[i], m));
  __syncwarp();
  if (lane == 0) {
    inv_sh = __fdiv_rn(1.0f, seq_sum_f32(pr, E));
  }
  __syncwarp();
  const float inv = inv_sh;
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
      for (int j = 0; j < k; j++) s = __fadd_rn(s, topw[j]);
      if (round_probs) s = D::rnd(s);
      for (int j = 0; j < k; j++) { float v = __fdiv_rn(topw[j], s); wout[j] = round_probs ? D::rnd(v) : v; }
    } else {
      for (int j = 0; j < k; j++) wout[j] = topw[j];
    }
  }
}

// softmax_topk fast path (E <= 256, k <= 32; softmax_topk_impl above stays the reference and
// the fused router tail): the same f32 max (lane l folds i = l, l+32, ... in order, then
// warp_max), the same exps, the same sequential lane-0 sum and r32(1/sum), the same p; the
// top-k rounds work on register keys with warp reductions instead of shared-memory scans.
// Key = bits(p) + 1 (p >= +0, so the bit order is the value order; NaN -> 0, never picked,
// as `v > bv` never picks NaN); ties -> lowest index, like the scan. A round where nothing
// valid remains writes id 0x7fffffff and weight -inf, what the scan writes there.
__device__ __forceinline__ u32 warp_max_u32(u32 v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
#endif
}
__device__ __forceinline__ u32 warp_min_u32(u32 v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_min_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
#endif
}
#define STK_PER 8
// One warp (lane = threadIdx.x & 31) routes one row: ids[0..k) and, when wout != 0, the
// weights, to global or shared memory; pr: E floats of shared memory. L2_ONLY: the logits are
// in global memory and read from L2 (ld.global.cg), so the fused routing (moe_topk_experts:
// gather_qmm_combine) may read them before its dependency wait when they come from two
// kernels back; else plain loads (moe_gating passes logits in shared memory).
template <class D, bool L2_ONLY>
__device__ __forceinline__ void softmax_topk_warp(const typename D::T* logits, u32* ids, float* wout, int E, int k,
                                                  int round_probs, int renorm, float* pr) {
  const int lane = threadIdx.x & 31;
  float xv[STK_PER];
  float m = -ZMLX_INF;
#pragma unroll
  for (int j = 0; j < STK_PER; j++) {
    const int i = lane + 32 * j;
    xv[j] = i < E ? D::ld(L2_ONLY ? ld_cg_elem(logits + i) : logits[i]) : 0.0f;
    if (i < E) m = fmaxf(m, xv[j]);
  }
  m = warp_max(m);
#pragma unroll
  for (int j = 0; j < STK_PER; j++) {
    const int i = lane + 32 * j;
    if (i < E) { xv[j] = mlx_exp(__fsub_rn(xv[j], m)); pr[i] = xv[j]; }
  }
  __syncwarp();
  float inv = 0.0f;
  if (lane == 0) inv = __fdiv_rn(1.0f, seq_sum_f32(pr, E));
  inv = __shfl_sync(0xffffffffu, inv, 0);
  u32 key[STK_PER];
#pragma unroll
  for (int j = 0; j < STK_PER; j++) {
    const int i = lane + 32 * j;
    float p = __fmul_rn(xv[j], inv);
    p = round_probs ? D::rnd(p) : p;
    key[j] = (i < E && p == p) ? __float_as_uint(p) + 1u : 0u;
  }
  float myw = 0.0f;
  for (int r = 0; r < k; r++) {
    u32 bk = 0u;
    int bj = 0;
#pragma unroll
    for (int j = 0; j < STK_PER; j++)
      if (key[j] > bk) { bk = key[j]; bj = j; }  // ascending j = ascending index: first max kept
    const u32 wk = warp_max_u32(bk);
    const u32 cand = (wk != 0u && bk == wk) ? (u32)(lane + 32 * bj) : 0xffffffffu;
    const u32 wi = wk != 0u ? warp_min_u32(cand) : 0x7fffffffu;
#pragma unroll
    for (int j = 0; j < STK_PER; j++)
      if ((u32)(lane + 32 * j) == wi) key[j] = 0u;
    const float v = wk != 0u ? __uint_as_float(wk - 1u) : -ZMLX_INF;
    if (lane == r) myw = v;
    if (lane == 0) ids[r] = wi;
  }
  if (wout == 0) return;
  if (renorm) {
    float s = 0.0f;
    for (int j = 0; j < k; j++) s = __fadd_rn(s, __shfl_sync(0xffffffffu, myw, j));
    if (round_probs) s = D::rnd(s);
    if (lane < k) { const float v = __fdiv_rn(myw, s); wout[lane] = round_probs ? D::rnd(v) : v; }
  } else if (lane < k) {
    wout[lane] = myw;
  }
}
template <class D>
__device__ __forceinline__ void softmax_topk_fast_impl(const typename D::T* logits, u32* __restrict__ ids,
                                                       float* __restrict__ wout, int E, int k, int round_probs, int renorm) {
  extern __shared__ float pr[];  // E floats; one warp per row (blockDim.x == 32)
  const long long row = blockIdx.x;
  softmax_topk_warp<D, false>(logits + row * E, ids + row * k, wout + row * k, E, k, round_probs, renorm, pr);
}

// Per-head q/k RMSNorm + RoPE (in place on q and k) + K/V cache append in one launch.
// One warp per row (n_heads q rows, then n_kv k rows), 128 threads per block. Bitwise
// identical to rms_norm(q) + rms_norm(k) + rope(q) + rope(k) + kv_append: rms_norm's
// launcher gives rows of hd <= 256 one warp (32 threads), whose path is reproduced here
// op for op (8 values per lane at i = lane + 32 j, fmaf in j order, warp_sum, then
// block_sum's second warp_sum of (lane 0 ? sum : 0)); the normalised row, rounded to the
// dtype as rms_norm stores it, goes through shared memory to rope's per-pair code
// (rope_impl's arithmetic, scale 1, dims = hd); the k rows' rotated values (as stored) and
// the v rows are written to the caches at *pos_ptr when 0 <= pos < max_len (kv_append).
#define QNR_WARPS 4
template <class D>
__device__ __forceinline__ void qk_norm_rope_append_impl(typename D::T* q, typename D::T* k, const typename D::T* v,
                                                         const typename D::T* __restrict__ qw, const typename D::T* __restrict__ kw,
                                                         typename D::T* kc, typename D::T* vc, const int* __restrict__ pos_ptr,
                                                         int hq, int hkv, int hd, int max_len, float eps, float inv_n,
                                                         float step, float scale) {
  __shared__ float buf[QNR_WARPS][256];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * QNR_WARPS + warp;
  if (row >= hq + hkv) return;
  const bool isk = row >= hq;
  const int kh = row - hq;
  typename D::T* x = isk ? k + (long long)kh * hd : q + (long long)row * hd;
  const int pos = *pos_ptr;
  const bool app = isk && pos >= 0 && pos < max_len;
  const long long co = ((long long)kh * max_len + pos) * hd;
  const int half = hd >> 1;
  norm_rope_row<D>(x, isk ? kw : qw, hd, eps, inv_n, pos, step, scale, buf[warp], lane, [&](int i, float o1, float o2) {
    const typename D::T t1 = D::st(o1), t2 = D::st(o2);
    x[i] = t1;
    x[i + half] = t2;
    if (app) { kc[co + i] = t1; kc[co + i + half] = t2; }
  });
  if (app)
    for (int i = lane; i < hd; i += 32) vc[co + i] = v[(long long)kh * hd + i];
}

// Weighted sum of k expert outputs y [k, n] with f32 weights w [k] (exact in the dtype):
// out = r( sum_j r(w_j * y_j) ), the products rounded to the dtype (MLX computes
// `y * scores` as a dtype array), their sum accumulated in f32 from 0 in list order and
// rounded once (MLX 0.32.4 reduces bf16/f16 sums in f32: zmlx-core `ops::sum_in_dtype`).
template <class D>
__device__ __forceinline__ void moe_combine_impl(const typename D::T* y, const float* w,
                                                 typename D::T* __restrict__ out, int k, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = 0.0f;
  for (int j = 0; j < k; j++) acc = __fadd_rn(acc, D::rnd(__fmul_rn(w[j], D::ld(y[(long long)j * n + i]))));
  out[i] = D::st(acc);
}

// swiglu: MLX sigmoid (e = r(exp|x|), y = 1/(1+e), s = r(x<0 ? y : 1-y)), silu = r(g*s), out = r(silu*u).
template <class D>
__device__ __forceinline__ void swiglu_impl(const typename D::T* g, const typename D::T* u,
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
__device__ __forceinline__ void argmax_impl(const typename D::T* x, u32* __restrict__ out,
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

// ---- mlx-lm's greedy token: argmax(logits - logsumexp(logits)) ----
// lse = r(logf(sum_i mlx_exp(l_i - max)) + max) (f32 max and sum, CUDA logf <= 1 ulp;
// lse = max when max is infinite), token = first index of the maximum of r(l_i - lse).
// Rounding after subtracting lse can merge the top logits into ties, and MLX's argmax
// keeps the lowest index, so plain argmax(logits) is not the same token.
// Two launches over the same grid of B blocks (block b owns [b*chunk, (b+1)*chunk)):
//   lpa_max:    block maxima -> blockmax[b] and an atomicMax of order-preserving bits (ws[0]);
//   lpa_select: block sums (each thread sums its strided elements in order, then a fixed
//               tree) -> partials[b]; the last block to finish sums the partials in a fixed
//               order (deterministic for a given grid), forms lse and R = r(max - lse).
//               r(l - lse) is monotone in l, so the maximisers are exactly the l >= some t:
//               the answer lies in the first block whose maximum satisfies
//               r(blockmax - lse) == R, and is the first index there that does (one scan
//               of <= chunk elements). R NaN (a NaN logit, an infinite max) -> token 0, as
//               MLX's argmax of an all-NaN row. It then zeroes ws[0..3) for the next call.
// The f32 sum runs in a different order than MLX's CPU loop (sequential), see docs/kernels.md.
// Workspace (words 0..1 zeroed once): u32 [0] max bits, [1] blocks done, [2] the last call's
// largest logprob R and [3] its lse (f32 bits, read by the sampler), then LPA_MAX_BLOCKS f32 partial sums, then LPA_MAX_BLOCKS f32 block maxima.
#define LPA_MAX_BLOCKS 1024
#define LPA_THREADS 256
__device__ __forceinline__ float from_ordered_bits(u32 u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
// Block-wide min of a u32; every thread gets the result. `sh` >= 32 words of shared memory.
__device__ __forceinline__ u32 block_min_u32(u32 v, u32* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // sh may still be read by an earlier call
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  v = sh[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); w++) v = min(v, sh[w]);
  return v;
}
template <class D>
__device__ __forceinline__ void lpa_max_impl(const typename D::T* x, u32* __restrict__ ws, int n, int chunk) {
  __shared__ float red[32];
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  float m = -ZMLX_INF;
  int i = start + threadIdx.x;
  for (; i + 3 * LPA_THREADS < end; i += 4 * LPA_THREADS) {
    const float a = D::ld(x[i]), b = D::ld(x[i + LPA_THREADS]), c = D::ld(x[i + 2 * LPA_THREADS]), d = D::ld(x[i + 3 * LPA_THREADS]);
    m = fmaxf(fmaxf(m, a), fmaxf(fmaxf(b, c), d));  // fmaxf drops NaN
  }
  for (; i < end; i += LPA_THREADS) m = fmaxf(m, D::ld(x[i]));
  m = block_max(m, red);
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(ws + 4 + LPA_MAX_BLOCKS)[blockIdx.x] = m;
    atomicMax(ws, ordered_bits(m));
  }
}
template <class D>
__device__ __forceinline__ void lpa_select_impl(const typename D::T* x, u32* __restrict__ ws,
                                                u32* __restrict__ out, int n, int chunk) {
  __shared__ float red[32];
  __shared__ u32 redu[32];
  __shared__ bool last;
  float* partials = reinterpret_cast<float*>(ws + 4);
  const float M = from_ordered_bits(ws[0]);
  const bool finite = fabsf(M) <= 3.4028234663852886e38f;
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  float s = 0.0f;
  for (int i = start + threadIdx.x; i < end; i += LPA_THREADS) s = __fadd_rn(s, mlx_exp(__fsub_rn(D::ld(x[i]), M)));
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
    __threadfence();
    const u32 done = atomicAdd(ws + 1, 1u);
    last = (done == gridDim.x - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const volatile float* vp = partials;
  const volatile float* vbm = reinterpret_cast<const float*>(ws + 4 + LPA_MAX_BLOCKS);
  float t = 0.0f;
  for (int b = threadIdx.x; b < (int)gridDim.x; b += LPA_THREADS) t = __fadd_rn(t, vp[b]);
  const float S = block_sum(t, red);
  const float lse = finite ? D::rnd(__fadd_rn(logf(S), M)) : M;
  const float R = D::rnd(__fsub_rn(M, lse));
  // the first block holding a maximiser (R NaN: none)
  u32 bb = 0xffffffffu;
  for (int b = threadIdx.x; b < (int)gridDim.x; b += LPA_THREADS)
    if (D::rnd(__fsub_rn(vbm[b], lse)) == R) bb = min(bb, (u32)b);
  bb = block_min_u32(bb, redu);
  u32 best = 0xffffffffu;
  if (bb != 0xffffffffu) {
    const int s0 = (int)bb * chunk, e0 = min(s0 + chunk, n);
    for (int i = s0 + threadIdx.x; i < e0; i += LPA_THREADS)
      if (D::rnd(__fsub_rn(D::ld(x[i]), lse)) == R) { best = (u32)i; break; }  // a thread's first hit is its lowest
  }
  best = block_min_u32(best, redu);
  if (threadIdx.x == 0) {
    *out = best == 0xffffffffu ? 0u : best;
    ws[0] = 0u;
    ws[1] = 0u;
    ws[2] = __float_as_uint(R);  // the largest logprob, for the sampler
    ws[3] = __float_as_uint(lse);
  }
}

// ---- random fills for --dummy-weights ----
// Value i of stream `seed` is h_i = mix(mix(seed) + (i+1)*0x9e3779b97f4a7c15): SplitMix64's
// i-th output from a scrambled start, a bijection of the counter, so every 32-bit word is
// possible and any range of any tensor can be filled independently.
__device__ __forceinline__ u64 zmix64(u64 z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// u32 words: the high half of h_i.
extern "C" __global__ void fill_random_u32(u32* __restrict__ p, u64 n, u64 seed) { ZMLX_GRID_DEP();
  const u64 base = zmix64(seed);
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    p[i] = (u32)(zmix64(base + (i + 1ull) * 0x9e3779b97f4a7c15ull) >> 32);
}
// Uniform in [lo, hi]: u = (h_i >> 40) * 2^-24, v = r(lo + (hi - lo) * u) (f32 ops, no FMA).
template <class D>
__device__ __forceinline__ void fill_uniform_impl(typename D::T* __restrict__ p, u64 n, u64 seed, float lo, float hi) {
  const u64 base = zmix64(seed);
  const float span = __fsub_rn(hi, lo);
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
    const u64 h = zmix64(base + (i + 1ull) * 0x9e3779b97f4a7c15ull);
    const float u = __fmul_rn((float)(u32)(h >> 40), 5.9604644775390625e-8f);
    p[i] = D::st(__fadd_rn(lo, __fmul_rn(span, u)));
  }
}
// y = r(a*x + b): f32 product, then f32 sum (no FMA), then one rounding. In place allowed.
template <class D>
__device__ __forceinline__ void affine_impl(const typename D::T* x, typename D::T* y, u64 n, float a, float b) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    y[i] = D::st(__fadd_rn(__fmul_rn(a, D::ld(x[i])), b));
}

// ---- sampling: zmlx_core::sampling, bit for bit ----
// Runs after logprobs_argmax, which leaves the greedy token at `out` and the largest logprob
// R and lse in its workspace words 2 and 3: lp_i = r(l_i - lse), x_i = lp_i - R (f64).
// Weights are u64 fixed point (round(e^x * 2^40), e^x from correctly rounded f64 + - * only),
// so every sum is an exact integer and block order cannot change a token. Kernels, each over
// B blocks owning contiguous chunks of the vocabulary, except smp_pick:
//   smp_prep_<dt>: key_i (order bits), q_i = W(x_i) (for top-p), w_i = W(x_i / temp) into the
//              workspace; Q = sum q (atomics).
//   smp_radix: (top-p and/or top-k; three launches: key bits 31-21, 20-10, 9-0) block
//              histograms of q (top-p) and of counts (top-k) over the tokens whose higher key
//              bits match the prefix found so far, added into global histograms; the last
//              block finds the digit where the running sum from the top crosses the target
//              (ceil(p*Q) for top-p, k for top-k), extends the prefix, zeroes the histograms.
//              After pass 2 the prefixes are v_p (the nucleus' lowest kept value) and v_k
//              (the k-th value), and carry_k counts the tokens above v_k.
//   smp_ties:  (top-k) tokens equal to v_k per block, turned into offsets by the last block:
//              of those, the first k - carry_k in index order are kept.
//   smp_mass:  each block's kept mass; the last block totals W, draws d = r*W >> 64 with
//              r = hash(*seed, *pos) and finds the block whose running mass crosses d.
//   smp_pick:  one block walks that chunk in index order to the first token past d, then
//              zeroes the state for the next call (graph replays need no memset).
// A row without a finite maximum keeps the greedy token.
#define SMP_THREADS 256
#define SMP_MAX_BLOCKS 1024
#define SMP_DIGITS 2048
#define SMP_HEADER 16
// header words (u64): state the kernels leave zeroed, then the last call's results (tests)
#define SMP_TOTAL_Q 0
#define SMP_TICKET 1
#define SMP_PREFIX_P 2
#define SMP_CARRY_P 3
#define SMP_PREFIX_K 4
#define SMP_CARRY_K 5
#define SMP_PICK_BLOCK 6
#define SMP_PICK_REM 7
#define SMP_MIN_KEY 8
#define SMP_OUT_Q 10
#define SMP_OUT_VP 11
#define SMP_OUT_VK 12
#define SMP_OUT_W 13
#define SMP_OUT_D 14
struct SmpWs {
  u64* h;     // header
  u64* tie;   // per block: ties with v_k, then their offsets
  u64* part;  // per block: kept mass
  u64* hp;    // global digit histograms (top-p mass, top-k count)
  u64* hk;
  u32* key;   // per token
  u64* q;
  u64* w;
};
__device__ __forceinline__ SmpWs smp_ws(u64* ws, int n) {
  SmpWs s;
  s.h = ws;
  s.tie = ws + SMP_HEADER;
  s.part = s.tie + SMP_MAX_BLOCKS;
  s.hp = s.part + SMP_MAX_BLOCKS;
  s.hk = s.hp + SMP_DIGITS;
  s.key = reinterpret_cast<u32*>(s.hk + SMP_DIGITS);
  s.q = reinterpret_cast<u64*>(s.key + ((n + 1) & ~1));
  s.w = s.q + n;
  return s;
}
__device__ __forceinline__ bool smp_finite_max(const u32* lpa) { return fabsf(__uint_as_float(lpa[2])) <= 3.4028234663852886e38f; }
// round(e^x * 2^40) for x <= 0 (0 below -29 and for NaN): zmlx_core::sampling::fixed_weight.
__device__ __forceinline__ u64 smp_fixed_weight(double x) {
  if (!(x >= -29.0)) return 0ull;
  x = fmin(x, 0.0);
  const u64 inv_fact[14] = {0x3ff0000000000000ull, 0x3ff0000000000000ull, 0x3fe0000000000000ull, 0x3fc5555555555555ull,
                            0x3fa5555555555555ull, 0x3f81111111111111ull, 0x3f56c16c16c16c17ull, 0x3f2a01a01a01a01aull,
                            0x3efa01a01a01a01aull, 0x3ec71de3a556c734ull, 0x3e927e4fb7789f5cull, 0x3e5ae64567f544e4ull,
                            0x3e21eed8eff8d898ull, 0x3de6124613a86d09ull};
  const double k = floor(__dadd_rn(__dmul_rn(x, __longlong_as_double(0x3ff71547652b82fell)), 0.5));
  const double r = __dsub_rn(__dsub_rn(x, __dmul_rn(k, __longlong_as_double(0x3fe62e42fee00000ll))),
                             __dmul_rn(k, __longlong_as_double(0x3dea39ef35793c76ll)));
  double p = __longlong_as_double((long long)inv_fact[13]);
#pragma unroll
  for (int c = 12; c >= 0; c--) p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double((long long)inv_fact[c]));
  const double scale = __longlong_as_double((long long)(1023 + (int)k + 40) << 52);
  return __double2ull_rn(__dmul_rn(p, scale));
}
// Exclusive prefix sum of v over the block (thread order); *total gets the sum. sh: 32 u64.
__device__ __forceinline__ u64 smp_block_scan(u64 v, u64* sh, u64* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  u64 inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncthreads();  // sh may still be read by an earlier call
  if (lane == 31) sh[warp] = inc;
  __syncthreads();
  u64 before = 0, all = 0;
  for (int i = 0; i < nw; i++) {
    before += i < warp ? sh[i] : 0ull;
    all += sh[i];
  }
  *total = all;
  return before + inc - v;
}
// The calling block is the last of the grid to arrive (a ticket in the header); it then sees
// every block's writes. The last block resets the ticket.
__device__ __forceinline__ bool smp_last_block(u64* h, bool* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(h + SMP_TICKET, 1ull) == gridDim.x - 1;
  __syncthreads();
  if (!*flag) return false;
  __threadfence();
  if (threadIdx.x == 0) h[SMP_TICKET] = 0ull;
  return true;
}
// In the last block: per-block values p[0..gridDim.x), four per thread (thread t owns blocks
// [4t, 4t + 4), SMP_MAX_BLOCKS in all) into v; returns the sum over the blocks before thread
// t's, and the sum over all in *total.
__device__ __forceinline__ u64 smp_scan_blocks(const u64* p, u64 v[4], u64* sh, u64* total) {
  u64 local = 0;
  for (int j = 0; j < 4; j++) {
    const int b = threadIdx.x * 4 + j;
    v[j] = b < (int)gridDim.x ? __ldcg(p + b) : 0ull;
    local += v[j];
  }
  return smp_block_scan(local, sh, total);
}
// min_p_on: also stores min-p's lowest kept key, that of r(R + min_p_log) (min_p_log = ln(min_p)
// rounded to the dtype by the host: mlx-lm's `max + math.log(min_p)` in the dtype).
template <class D>
__device__ __forceinline__ void smp_prep_impl(const typename D::T* x, const u32* lpa, u64* ws, int n, int chunk,
                                              double temp, int need_q, float min_p_log, int min_p_on) {
  __shared__ u64 sh[32];
  if (!smp_finite_max(lpa)) return;
  const SmpWs s = smp_ws(ws, n);
  const float R = __uint_as_float(lpa[2]), lse = __uint_as_float(lpa[3]);
  if (min_p_on && blockIdx.x == 0 && threadIdx.x == 0) s.h[SMP_MIN_KEY] = ordered_bits(D::rnd(__fadd_rn(R, min_p_log)));
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  u64 sq = 0;
  for (int i = start + threadIdx.x; i < end; i += SMP_THREADS) {
    const float lp = D::rnd(__fsub_rn(D::ld(x[i]), lse));
    const double xd = __dsub_rn((double)lp, (double)R);
    const u64 q = need_q ? smp_fixed_weight(xd) : 0ull;
    s.key[i] = lp != lp ? 0u : ordered_bits(lp);
    s.q[i] = q;
    s.w[i] = smp_fixed_weight(temp == 1.0 ? xd : __ddiv_rn(xd, temp));
    sq += q;
  }
  u64 total;
  smp_block_scan(sq, sh, &total);
  if (threadIdx.x == 0 && total) atomicAdd(s.h + SMP_TOTAL_Q, total);
}
// In the last block: the digit (of 2^width, from the top) where the running sum of the global
// histogram g crosses `target`; adds the sum above it to *carry and the digit to *prefix.
// Zeroes g.
__device__ __forceinline__ void smp_find_digit(u64* g, int width, int shift, u64 target, u64* prefix, u64* carry, u64* sh) {
  __shared__ u64 found[2];
  const int per = (1 << width) / SMP_THREADS, top = (1 << width) - 1 - threadIdx.x * per;
  u64 local = 0;
  for (int j = 0; j < per; j++) local += __ldcg(g + top - j);
  u64 all;
  const u64 before = smp_block_scan(local, sh, &all);
  if (threadIdx.x == 0) { found[0] = 0; found[1] = all; }
  __syncthreads();
  if (before <= target && target < before + local) {
    u64 run = before;
    for (int j = 0; j < per; j++) {
      const u64 v = __ldcg(g + top - j);
      if (run + v > target) { found[0] = (u64)(top - j); found[1] = run; break; }
      run += v;
    }
  }
  __syncthreads();
  for (int j = 0; j < per; j++) g[top - j] = 0ull;
  if (threadIdx.x == 0) {
    *prefix |= found[0] << shift;
    *carry += found[1];
  }
}
extern "C" __global__ void __launch_bounds__(SMP_THREADS) smp_radix(const u32* lpa, u64* ws, int n, int chunk, int pass,
                                                                   u64 top_p_fixed, u64 top_k) { ZMLX_GRID_DEP();
  __shared__ u64 hp[SMP_DIGITS], hk[SMP_DIGITS];
  __shared__ u64 sh[32];
  __shared__ bool last;
  if (!smp_finite_max(lpa)) return;
  const SmpWs s = smp_ws(ws, n);
  const bool P = top_p_fixed != 0, K = top_k != 0;
  const int width = pass == 2 ? 10 : 11, shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
  const u32 himask = pass == 0 ? 0u : 0xffffffffu << (shift + width), dmask = (1u << width) - 1;
  const u32 pre_p = (u32)s.h[SMP_PREFIX_P], pre_k = (u32)s.h[SMP_PREFIX_K];
  for (int j = threadIdx.x; j < SMP_DIGITS; j += SMP_THREADS) hp[j] = hk[j] = 0ull;
  __syncthreads();
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  for (int i = start + threadIdx.x; i < end; i += SMP_THREADS) {
    const u32 key = s.key[i], d = (key >> shift) & dmask;
    if (P && (key & himask) == pre_p) {
      const u64 q = s.q[i];
      if (q) atomicAdd(hp + d, q);
    }
    if (K && (key & himask) == pre_k) atomicAdd(hk + d, 1ull);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < SMP_DIGITS; j += SMP_THREADS) {
    if (hp[j]) atomicAdd(s.hp + j, hp[j]);
    if (hk[j]) atomicAdd(s.hk + j, hk[j]);
  }
  if (!smp_last_block(s.h, &last)) return;
  if (P) {
    const u64 Q = s.h[SMP_TOTAL_Q];
    const u64 prod_hi = __umul64hi(Q, top_p_fixed), prod_lo = Q * top_p_fixed;
    const u64 target = prod_hi + (prod_lo != 0ull);  // ceil(p * Q) >= 1
    smp_find_digit(s.hp, width, shift, target - 1ull - s.h[SMP_CARRY_P], s.h + SMP_PREFIX_P, s.h + SMP_CARRY_P, sh);
  }
  if (K) smp_find_digit(s.hk, width, shift, top_k - 1ull - s.h[SMP_CARRY_K], s.h + SMP_PREFIX_K, s.h + SMP_CARRY_K, sh);
}
extern "C" __global__ void __launch_bounds__(SMP_THREADS) smp_ties(const u32* lpa, u64* ws, int n, int chunk) { ZMLX_GRID_DEP();
  __shared__ u64 sh[32];
  __shared__ bool last;
  if (!smp_finite_max(lpa)) return;
  const SmpWs s = smp_ws(ws, n);
  const u32 v_k = (u32)s.h[SMP_PREFIX_K];
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  u64 c = 0;
  for (int i = start + threadIdx.x; i < end; i += SMP_THREADS) c += s.key[i] == v_k;
  u64 total;
  smp_block_scan(c, sh, &total);
  if (threadIdx.x == 0) s.tie[blockIdx.x] = total;
  if (!smp_last_block(s.h, &last)) return;
  // counts -> exclusive offsets in block order
  u64 v[4], all, run = smp_scan_blocks(s.tie, v, sh, &all);
  for (int j = 0; j < 4; j++) {
    const int b = threadIdx.x * 4 + j;
    if (b < (int)gridDim.x) s.tie[b] = run;
    run += v[j];
  }
}
// Which tokens are kept: value >= v_lo (the nucleus' v_p and min-p's key, the larger), and
// within the first k of the (value desc, index asc) order: above v_k, or tied with it among the
// first keep_ties in index order.
struct SmpKeep {
  u32 v_p, v_lo, v_k;
  u64 keep_ties;
  bool k_on;
};
__device__ __forceinline__ SmpKeep smp_keep(const SmpWs& s, u64 top_p_fixed, u64 top_k) {
  SmpKeep c;
  c.v_p = top_p_fixed ? (u32)s.h[SMP_PREFIX_P] : 0u;
  c.v_lo = max(c.v_p, (u32)s.h[SMP_MIN_KEY]);  // 0 when min-p is off
  c.k_on = top_k != 0;
  c.v_k = c.k_on ? (u32)s.h[SMP_PREFIX_K] : 0u;
  c.keep_ties = c.k_on ? top_k - s.h[SMP_CARRY_K] : 0ull;
  return c;
}
// The kept weight of token i (0 when not kept or !valid) for a tile of the block's threads in
// index order; ties_before: tokens tied with v_k before this tile (updated). All threads call.
__device__ __forceinline__ u64 smp_kept_weight(const SmpWs& s, const SmpKeep& c, int i, bool valid, u64* ties_before, u64* sh) {
  const u32 key = valid ? s.key[i] : 0u;
  bool kept = valid && key >= c.v_lo;
  if (c.k_on) {
    const bool tie = valid && key == c.v_k;
    u64 tile_ties;
    const u64 rank = *ties_before + smp_block_scan(tie ? 1ull : 0ull, sh, &tile_ties);
    kept = kept && (key > c.v_k || (tie && rank < c.keep_ties));
    *ties_before += tile_ties;
  }
  return kept ? s.w[i] : 0ull;
}
extern "C" __global__ void __launch_bounds__(SMP_THREADS) smp_mass(const u32* lpa, u64* ws, int n, int chunk, u64 top_p_fixed,
                                                                  u64 top_k, const u64* seed, const u32* pos) { ZMLX_GRID_DEP();
  __shared__ u64 sh[32];
  __shared__ bool last;
  if (!smp_finite_max(lpa)) return;
  const SmpWs s = smp_ws(ws, n);
  const SmpKeep c = smp_keep(s, top_p_fixed, top_k);
  u64 ties = c.k_on ? s.tie[blockIdx.x] : 0ull, acc = 0;
  const int start = blockIdx.x * chunk, end = min(start + chunk, n);
  for (int base = start; base < end; base += SMP_THREADS) {
    const int i = base + threadIdx.x;
    acc += smp_kept_weight(s, c, i, i < end, &ties, sh);
  }
  u64 total;
  smp_block_scan(acc, sh, &total);
  if (threadIdx.x == 0) s.part[blockIdx.x] = total;
  if (!smp_last_block(s.h, &last)) return;
  u64 v[4], W, run = smp_scan_blocks(s.part, v, sh, &W);
  const uint2 sd = ld_act8(seed);
  const u64 base = zmix64(((u64)sd.y << 32) | sd.x);
  const u64 r = zmix64(base + ((u64)ld_act4(pos) + 1ull) * 0x9e3779b97f4a7c15ull);
  const u64 d = __umul64hi(r, W);
  for (int j = 0; j < 4; j++) {
    if (run <= d && d < run + v[j]) {
      s.h[SMP_PICK_BLOCK] = (u64)(threadIdx.x * 4 + j);
      s.h[SMP_PICK_REM] = d - run;
    }
    run += v[j];
  }
  if (threadIdx.x == 0) {
    s.h[SMP_OUT_Q] = s.h[SMP_TOTAL_Q];
    s.h[SMP_OUT_VP] = c.v_p;
    s.h[SMP_OUT_VK] = c.v_k;
    s.h[SMP_OUT_W] = W;
    s.h[SMP_OUT_D] = d;
  }
}
extern "C" __global__ void __launch_bounds__(SMP_THREADS) smp_pick(const u32* lpa, u64* ws, u32* out, int n, int chunk,
                                                                  u64 top_p_fixed, u64 top_k) { ZMLX_GRID_DEP();
  __shared__ u64 sh[32];
  __shared__ int hit;
  const SmpWs s = smp_ws(ws, n);
  if (smp_finite_max(lpa)) {
    const SmpKeep c = smp_keep(s, top_p_fixed, top_k);
    const int b = (int)s.h[SMP_PICK_BLOCK];
    const u64 rem = s.h[SMP_PICK_REM];
    u64 ties = c.k_on ? s.tie[b] : 0ull, run = 0;
    const int start = b * chunk, end = min(start + chunk, n);
    if (threadIdx.x == 0) hit = -1;
    for (int base = start; base < end; base += SMP_THREADS) {
      const int i = base + threadIdx.x;
      const u64 w = smp_kept_weight(s, c, i, i < end, &ties, sh);
      u64 tile;
      const u64 before = run + smp_block_scan(w, sh, &tile);
      if (w && before <= rem && rem < before + w) hit = i;  // exactly one thread of one tile
      run += tile;
      __syncthreads();
      if (hit >= 0) break;
    }
    if (threadIdx.x == 0 && hit >= 0) *out = (u32)hit;
  }
  if (threadIdx.x == 0) {
    s.h[SMP_TOTAL_Q] = 0ull;
    s.h[SMP_PREFIX_P] = 0ull;
    s.h[SMP_CARRY_P] = 0ull;
    s.h[SMP_PREFIX_K] = 0ull;
    s.h[SMP_CARRY_K] = 0ull;
    s.h[SMP_MIN_KEY] = 0ull;
  }
}

// ---- dense (unquantized) matrix-vector products ----
// y[r] = r( sum_k x[k]*W[r,k] ): each thread owns one row and accumulates in f32 in k
// order from 0, product then add (no FMA) -- the order of MLX's CPU gemm for bf16/f16
// and of the reference sgemm for f32 (zmlx-core `ops::matmul_t`), so the result is
// bit-identical to it. A block stages MVD_ROWS rows x MVD_TK columns in shared memory
// with 16-byte coalesced loads (the next tile's loads issued before this tile's sums).
// blockIdx.y is the slot: W = W_stacked[ids[slot]] when ids != 0, x advanced by x_stride.
#define MVD_ROWS 128
#define MVD_TK 32
template <class D>
__device__ __forceinline__ void mv_dense_impl(const typename D::T* __restrict__ w, const typename D::T* x,
                                              typename D::T* __restrict__ y, const u32* ids, int N, int K,
                                              int x_stride) {
  typedef typename D::T T;
  constexpr int WPR = MVD_TK * (int)sizeof(T) / 4;    // u32 words per row tile (16 bf16/f16, 32 f32)
  constexpr int CPR = WPR / 4;                         // 16-byte chunks per row tile
  constexpr int EPC = 16 / (int)sizeof(T);             // elements per chunk
  constexpr int PER = MVD_ROWS * CPR / MVD_ROWS;       // chunks per thread (= CPR)
  __shared__ u32 tile[MVD_ROWS * (WPR + 1)];           // +1 word: conflict-free row reads
  __shared__ float xs[MVD_TK];
  const int slot = blockIdx.y;
  if (ids) w += (long long)ids[slot] * N * K;
  x += (long long)slot * x_stride;
  y += (long long)slot * N;
  const int r0 = blockIdx.x * MVD_ROWS, tid = threadIdx.x;
  uint4 buf[PER];
  auto load = [&](int k0) {
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const int c = tid + j * MVD_ROWS, rr = c / CPR, pc = c % CPR, grow = r0 + rr;
      const int col = k0 + pc * EPC;
      if (grow < N && col < K) buf[j] = __ldg(reinterpret_cast<const uint4*>(w + (long long)grow * K + col));
      else buf[j] = make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load(0);
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += MVD_TK) {
    const int kn = min(MVD_TK, K - k0);
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const int c = tid + j * MVD_ROWS, rr = c / CPR, pc = c % CPR;
      u32* dst = tile + rr * (WPR + 1) + pc * 4;
      dst[0] = buf[j].x; dst[1] = buf[j].y; dst[2] = buf[j].z; dst[3] = buf[j].w;
    }
    if (tid < kn) xs[tid] = D::ld(x[k0 + tid]);
    __syncthreads();
    if (k0 + MVD_TK < K) load(k0 + MVD_TK);
    const u32* row = tile + tid * (WPR + 1);
    if constexpr (sizeof(T) == 2) {
      for (int j = 0; j < kn; j += 2) {
        const u32 wd = row[j >> 1];
        const float w0 = D::ld((T)(wd & 0xffffu)), w1 = D::ld((T)(wd >> 16));
        acc = __fadd_rn(acc, __fmul_rn(xs[j], w0));
        if (j + 1 < kn) acc = __fadd_rn(acc, __fmul_rn(xs[j + 1], w1));
      }
    } else {
      for (int j = 0; j < kn; j++) acc = __fadd_rn(acc, __fmul_rn(xs[j], __uint_as_float(row[j])));
    }
    __syncthreads();
  }
  if (r0 + tid < N) y[r0 + tid] = D::st(acc);
}

// Unquantized embedding row: out[d] = table[*id_ptr, d] (a copy).
template <class D>
__device__ __forceinline__ void embed_dense_impl(const typename D::T* __restrict__ table, const u32* __restrict__ id_ptr,
                                                 typename D::T* __restrict__ out, int dim) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= dim) return;
  out[d] = table[(long long)(*id_ptr) * dim + d];
}

// Vectorized device copy (16 bytes per thread per step), for the bandwidth baseline.
extern "C" __global__ void copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst, long long n16) { ZMLX_GRID_DEP();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x)
    dst[i] = __ldg(src + i);
}

// Attention for one head_dim: attn_single_<dt>_d<HD>, attn_split_long_<dt>_d<HD>, attn_combine_long_<dt>_d<HD>.
#define ZMLX_ATTN_HD(DT, DN, HD)                                                                               \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_single_##DN##_d##HD(                         \
      const DT::T* q, const DT::T* kc, const DT::T* vc, DT::T* y, float* part, const int* len, int len_add,     \
      int G, int max_len, float scale) { /* waits inside, after the early loads */                            \
    attn_single_impl<DT, HD>(q, kc, vc, y, part, len, len_add, G, max_len, scale);                             \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_single_qknr_##DN##_d##HD(                    \
      const DT::T* q, DT::T* kc, DT::T* vc, DT::T* y, float* part, const int* len, int len_add, int G,         \
      int max_len, float scale, const DT::T* k, const DT::T* v, const DT::T* qw, const DT::T* kw, float eps,   \
      float inv_n, float step) { /* waits inside, after the early loads */                                     \
    const QkPrologue<DT> pro{k, v, qw, kw, kc, vc, eps, inv_n, step};                                          \
    attn_single_impl<DT, HD, true>(q, kc, vc, y, part, len, len_add, G, max_len, scale, &pro);                       \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_split_long_##DN##_d##HD(                     \
      const DT::T* q, const DT::T* kc, const DT::T* vc, float* part, const int* len, int len_add, int G,       \
      int max_len, float scale) { /* waits inside, after the early loads */                                   \
    attn_split_long_impl<DT, HD>(q, kc, vc, part, len, len_add, G, max_len, scale);                            \
  }                                                                                                            \
  extern "C" __global__ void attn_combine_long_##DN##_d##HD(const float* part, DT::T* y, const int* len,       \
                                                            int len_add, int G, int S, int max_len, int chunk) {  \
    ZMLX_GRID_DEP();                                                                                           \
    attn_combine_long_impl<DT, HD>(part, y, len, len_add, G, S, max_len, chunk);                               \
  }

// group_topk: the "noaux_tc" gating of DeepSeek-V3 / Kimi-K2 / GLM-4.x (mlx-lm's
// group_expert_select) for one token, one block, one thread per expert (E <= 1024):
// p = MLX's f32 sigmoid of f32(logit), s = p + bias; with n_group > 1 the n_group - topk_group
// groups whose score (their two largest s summed) ranks lowest (ties: the lower index counts as
// lower) get s = 0; the k largest s (ties by lower index) are listed by descending s (MLX lists
// them in argpartition order instead: zmlx-core SelectOrder::Descending is this order); their
// weights p, divided by their f32 sum in list order when norm (and k > 1), times scaling.
// Ranks, not a sort: thread e counts the experts that go before it. NaN logits: unspecified.
#define GTK_MAX_E 1024
template <class D>
__device__ __forceinline__ void group_topk_impl(const typename D::T* logits, const float* bias, u32* ids, float* w, int E,
                                                int k, int n_group, int topk_group, float scaling, int norm) {
  __shared__ float s_sh[GTK_MAX_E], p_sel[64], g_sc[64];
  __shared__ int g_drop[64];
  const int e = threadIdx.x, per = E / n_group;
  float p = 0.0f;
  if (e < E) {
    const float x = D::ld(logits[e]);
    const float y = __fdiv_rn(1.0f, __fadd_rn(1.0f, mlx_exp(fabsf(x))));
    p = x < 0.0f ? y : __fsub_rn(1.0f, y);
    s_sh[e] = __fadd_rn(p, bias[e]);
  }
  __syncthreads();
  if (n_group > 1) {
    if (e < n_group) {  // the group's two largest scores, as zmlx-core scans them
      float t0 = __int_as_float(0xff800000), t1 = t0;  // -inf
      for (int i = e * per; i < (e + 1) * per; i++) {
        const float v = s_sh[i];
        if (v > t0) { t1 = t0; t0 = v; } else if (v > t1) t1 = v;
      }
      g_sc[e] = per == 1 ? t0 : __fadd_rn(t0, t1);
    }
    __syncthreads();
    if (e < n_group) {
      int rank = 0;
      for (int h = 0; h < n_group; h++) rank += g_sc[h] < g_sc[e] || (g_sc[h] == g_sc[e] && h < e);
      g_drop[e] = rank < n_group - topk_group;
    }
    __syncthreads();
    if (e < E && g_drop[e / per]) s_sh[e] = 0.0f;
    __syncthreads();
  }
  if (e < E) {
    const float v = s_sh[e];
    int rank = 0;
    for (int j = 0; j < E; j++) rank += s_sh[j] > v || (s_sh[j] == v && j < e);
    if (rank < k) { ids[rank] = e; p_sel[rank] = p; }
  }
  __syncthreads();
  if (e == 0) {
    float den = 0.0f;
    if (norm && k > 1)
      for (int j = 0; j < k; j++) den = __fadd_rn(den, p_sel[j]);
    for (int j = 0; j < k; j++) w[j] = __fmul_rn(norm && k > 1 ? __fdiv_rn(p_sel[j], den) : p_sel[j], scaling);
  }
}

#define ZMLX_OPS(DT, DN)                                                                                       \
  extern "C" __global__ void rms_norm_##DN(const DT::T* x, const DT::T* w, DT::T* y, int n, float eps,         \
                                           float inv_n) { /* waits inside */ rms_norm_impl<DT>(x, w, y, n, eps, inv_n); }         \
  extern "C" __global__ void rope_##DN(const DT::T* x, DT::T* y, const int* pos, int pos_add, int rows, int hd, \
                                       int dims, float step, float scale) { ZMLX_GRID_DEP();                                    \
    rope_impl<DT>(x, y, pos, pos_add, rows, hd, dims, step, scale);                                            \
  }                                                                                                            \
  extern "C" __global__ void kv_append_##DN(const DT::T* k, const DT::T* v, DT::T* kc, DT::T* vc,             \
                                            const int* pos, int pos_add, int n_kv, int max_len, int hd) { ZMLX_GRID_DEP();      \
    kv_append_impl<DT>(k, v, kc, vc, pos, pos_add, n_kv, max_len, hd);                                         \
  }                                                                                                            \
  ZMLX_ATTN_HD(DT, DN, 16)                                                                                     \
  ZMLX_ATTN_HD(DT, DN, 32)                                                                                     \
  ZMLX_ATTN_HD(DT, DN, 64)                                                                                     \
  ZMLX_ATTN_HD(DT, DN, 128)                                                                                    \
  extern "C" __global__ void softmax_topk_##DN(const DT::T* logits, u32* ids, float* w, int E, int k,          \
                                               int round_probs, int renorm) { ZMLX_GRID_DEP();                                  \
    if (E <= 32 * STK_PER && k <= 32) softmax_topk_fast_impl<DT>(logits, ids, w, E, k, round_probs, renorm);   \
    else softmax_topk_impl<DT>(logits, ids, w, E, k, round_probs, renorm);                                     \
  }                                                                                                            \
  extern "C" __global__ void group_topk_##DN(const DT::T* logits, const float* bias, u32* ids, float* w, int E,   \
                                             int k, int n_group, int topk_group, float scaling, int norm) {            \
    ZMLX_GRID_DEP();                                                                                           \
    group_topk_impl<DT>(logits, bias, ids, w, E, k, n_group, topk_group, scaling, norm);                       \
  }                                                                                                            \
  extern "C" __global__ void softmax_topk_legacy_##DN(const DT::T* logits, u32* ids, float* w, int E, int k,   \
                                                      int round_probs, int renorm) { ZMLX_GRID_DEP();                           \
    softmax_topk_impl<DT>(logits, ids, w, E, k, round_probs, renorm);                                          \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * QNR_WARPS) qk_norm_rope_append_##DN(                       \
      DT::T* q, DT::T* k, const DT::T* v, const DT::T* qw, const DT::T* kw, DT::T* kc, DT::T* vc,              \
      const int* pos, int hq, int hkv, int hd, int max_len, float eps, float inv_n, float step, float scale) { ZMLX_GRID_DEP(); \
    qk_norm_rope_append_impl<DT>(q, k, v, qw, kw, kc, vc, pos, hq, hkv, hd, max_len, eps, inv_n, step, scale); \
  }                                                                                                            \
  extern "C" __global__ void moe_combine_##DN(const DT::T* y, const float* w, DT::T* out, int k, int n) { ZMLX_GRID_DEP();      \
    moe_combine_impl<DT>(y, w, out, k, n);                                                                     \
  }                                                                                                            \
  extern "C" __global__ void swiglu_##DN(const DT::T* g, const DT::T* u, DT::T* out, int n) { ZMLX_GRID_DEP();                  \
    swiglu_impl<DT>(g, u, out, n);                                                                             \
  }                                                                                                            \
  extern "C" __global__ void add_##DN(const DT::T* a, const DT::T* b, DT::T* out, int n) { ZMLX_GRID_DEP();                     \
    add_impl<DT>(a, b, out, n);                                                                                \
  }                                                                                                            \
  extern "C" __global__ void embed_##DN(const u32* w, const DT::T* s, const DT::T* b, const u32* id,           \
                                        DT::T* out, int dim, int bits, int gs) { ZMLX_GRID_DEP();                               \
    embed_impl<DT>(w, s, b, id, out, dim, bits, gs);                                                           \
  }                                                                                                            \
  extern "C" __global__ void argmax_##DN(const DT::T* x, u32* out, u64* ws, int n) { ZMLX_GRID_DEP(); argmax_impl<DT>(x, out, ws, n); } \
  extern "C" __global__ void __launch_bounds__(LPA_THREADS) lpa_max_##DN(const DT::T* x, u32* ws, int n,        \
                                                                          int chunk) { ZMLX_GRID_DEP();                         \
    lpa_max_impl<DT>(x, ws, n, chunk);                                                                         \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(LPA_THREADS) lpa_select_##DN(const DT::T* x, u32* ws, u32* out, \
                                                                             int n, int chunk) { ZMLX_GRID_DEP();               \
    lpa_select_impl<DT>(x, ws, out, n, chunk);                                                                 \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(SMP_THREADS) smp_prep_##DN(const DT::T* x, const u32* lpa, u64* ws, \
                                                                         int n, int chunk, double temp, int need_q,     \
                                                                         float min_p_log, int min_p_on) { ZMLX_GRID_DEP(); \
    smp_prep_impl<DT>(x, lpa, ws, n, chunk, temp, need_q, min_p_log, min_p_on);                                \
  }                                                                                                            \
  extern "C" __global__ void fill_random_uniform_##DN(DT::T* p, u64 n, u64 seed, float lo, float hi) { ZMLX_GRID_DEP();         \
    fill_uniform_impl<DT>(p, n, seed, lo, hi);                                                                 \
  }                                                                                                            \
  extern "C" __global__ void affine_##DN(const DT::T* x, DT::T* y, u64 n, float a, float b) { ZMLX_GRID_DEP();                   \
    affine_impl<DT>(x, y, n, a, b);                                                                            \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(MVD_ROWS) mv_dense_##DN(const DT::T* w, const DT::T* x,         \
                                                                       DT::T* y, const u32* ids, int N, int K, \
                                                                       int x_stride) { ZMLX_GRID_DEP();                         \
    mv_dense_impl<DT>(w, x, y, ids, N, K, x_stride);                                                           \
  }                                                                                                            \
  extern "C" __global__ void embed_dense_##DN(const DT::T* t, const u32* id, DT::T* out, int dim) { ZMLX_GRID_DEP();            \
    embed_dense_impl<DT>(t, id, out, dim);                                                                     \
  }
