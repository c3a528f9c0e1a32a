// Quantized matrix-vector products on MLX affine-quantized weights.
//
// W [N, K] (optionally stacked [E, N, K] for MoE experts). Codes of a row form a
// little-endian bit stream (code j at bits [j*BITS, (j+1)*BITS)), which covers both the
// u32 LSB-first packing of 2/4/8 bits and MLX's byte layouts for 3/5/6 bits. A run of
// 32 codes is exactly BITS u32 words, and lies in one quantization group (GS >= 32).
//
// Contract: y[n] = round_dtype( sum_groups( s*sum(q*x) + b*sum(x) ) ), every product
// and sum in f32 (FMA allowed): f32 accumulation, output rounded once to the dtype; with a
// residual, y[n] = round_dtype(res[n] + that), exactly the unfused qmv then add.
// Each warp owns R rows; lane l walks the 32-code chunks l, l+32, ... of those rows,
// loading the x chunk once for all R rows. blockIdx.y is the slot (expert) index.

template <int BITS> __device__ __forceinline__ void load_words(const u32* __restrict__ p, u32* q) {
  if (BITS == 4) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
  } else if (BITS == 8) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w; q[4] = u.x; q[5] = u.y; q[6] = u.z; q[7] = u.w;
  } else if (BITS == 2) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    q[0] = v.x; q[1] = v.y;
  } else if (BITS == 6) {
#pragma unroll
    for (int i = 0; i < 3; i++) { uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i); q[2*i] = v.x; q[2*i+1] = v.y; }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; i++) q[i] = __ldg(p + i);
  }
}

// Code j (0..31, compile-time after unrolling) of a 32-code chunk, as an exact float,
// in 2 instructions (LOP3 + FADD) where the code does not straddle a word: the masked
// field is ORed under an exponent chosen so that the mantissa LSB of the field is 1.0,
// i.e. float(e<<23 | q<<off) = 2^(23-off) + q; subtracting 2^(23-off) leaves q exactly.
// `mask` = 2^BITS - 1 arrives as a kernel parameter on purpose: with the shifted masks in
// registers, AND-with-mask then OR-with-exponent is one LOP3 (it takes one immediate only).
// (Measured on H100: register masks help 4/6/8-bit, but slow 3-bit by 30%, so 3/5-bit keep
// immediate masks.)
template <int BITS, int J> __device__ __forceinline__ float code_at(const u32* q, u32 mask_param) {
  const int bp = J * BITS, wi = bp >> 5, off = bp & 31;
  const u32 mask = (BITS == 3 || BITS == 5) ? ((1u << BITS) - 1u) : mask_param;
  u32 v;
  int sh;
  if (off + BITS <= 23) {
    v = q[wi] & (mask << off);
    sh = off;
  } else if (off + BITS <= 32) {
    v = (q[wi] >> 16) & (mask << (off - 16));
    sh = off - 16;
  } else {
    v = __funnelshift_r(q[wi], q[wi + 1], off) & mask;
    sh = 0;
  }
  const u32 e = (u32)(150 - sh) << 23;
  return __fsub_rn(__uint_as_float(v | e), __uint_as_float(e));
}

// sum_j q_j * x_j over the 32 codes, two interleaved FMA chains.
template <int BITS> __device__ __forceinline__ float chunk_dot(const u32* q, const float* xv, u32 mask) {
  float a0 = 0.0f, a1 = 0.0f;
#define ZQ(J) a0 = fmaf(code_at<BITS, J>(q, mask), xv[J], a0); a1 = fmaf(code_at<BITS, J + 1>(q, mask), xv[J + 1], a1);
  ZQ(0) ZQ(2) ZQ(4) ZQ(6) ZQ(8) ZQ(10) ZQ(12) ZQ(14) ZQ(16) ZQ(18) ZQ(20) ZQ(22) ZQ(24) ZQ(26) ZQ(28) ZQ(30)
#undef ZQ
  return a0 + a1;
}

// Where qmv_lane_partials reads x: 32 values (as f32) of chunk c, of row r's x when XR.
// XGlobal: x in the dtype in global memory, xr[0] shared or xr[r] per row.
// XSharedF32: one x already in f32 in shared memory (the same values XGlobal would give).
template <class D> struct XGlobal {
  const typename D::T* const* xr;
  __device__ __forceinline__ void operator()(int r, int c, float* xv) const {
    const typename D::T* p = xr[r] + c * 32;
    ZMLX_AFTER_DEP(p);  // x may come from the previous kernel: read it after the wait
#pragma unroll
    for (int i = 0; i < 4; i++) load8<D>(p + 8 * i, xv + 8 * i);
  }
};
struct XSharedF32 {
  const float* x;
  __device__ __forceinline__ void operator()(int, int c, float* xv) const {
    const float4* p = reinterpret_cast<const float4*>(x + c * 32);
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const float4 v = p[i];
      xv[4 * i] = v.x; xv[4 * i + 1] = v.y; xv[4 * i + 2] = v.z; xv[4 * i + 3] = v.w;
    }
  }
};

// One warp's per-lane partial dot products for R rows (the qmv contract's inner loop,
// shared with the fused kernels so their dot products are bitwise those of qmv): lane
// `lane` walks the 32-code chunks lane, lane+32, ... of every row; row r's result is
// warp_sum(acc[r]). wr/sr/br: the rows' words, scales and biases; `xl` loads x: one x
// shared by all rows (XR false, loaded once per chunk) or row r's own x (XR true).
// The per-row arithmetic is the same in both cases: xs = (even sum) + (odd sum),
// acc = fma(s, chunk_dot, fma(b, xs, acc)).
// `after` runs once the first chunk's weight loads are issued, before x is read. `true`:
// the kernel has not waited for the previous one yet (programmatic dependent launch): wait
// now, so the loads overlap the previous kernel's tail (only for weights nothing in the
// stream writes). A callable: wait and build x (moe_gating's norm); every thread of the
// block must then reach it (callers pass chunks = 0 for idle warps).
__device__ __forceinline__ void after_first_load(bool dep) {
  if (dep) ZMLX_GRID_DEP();
}
template <class F> __device__ __forceinline__ void after_first_load(const F& f) { f(); }
template <class D, int BITS, int GS, int R, bool XR, class XL, class After = bool>
__device__ __forceinline__ void qmv_lane_partials(const u32* const* wr, const typename D::T* const* sr,
                                                  const typename D::T* const* br, const XL& xl, int chunks,
                                                  int lane, u32 qmask, float* acc, const After& after = false) {
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = 0.0f;
  // Software pipeline: the next chunk's words, scales and biases are in flight while
  // the current chunk is computed.
  u32 q[R][BITS];
  typename D::T s16[R], b16[R];
  int c = lane;
  if (c < chunks) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      load_words<BITS>(wr[r] + (long long)c * BITS, q[r]);
      s16[r] = sr[r][(c * 32) / GS];
      b16[r] = br[r][(c * 32) / GS];
    }
  }
  after_first_load(after);
  for (; c < chunks; c += 32) {
    const int cn = c + 32;
    u32 qn[R][BITS];
    typename D::T sn[R], bn[R];
    if (cn < chunks) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        load_words<BITS>(wr[r] + (long long)cn * BITS, qn[r]);
        sn[r] = sr[r][(cn * 32) / GS];
        bn[r] = br[r][(cn * 32) / GS];
      }
    }
    if (XR) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        float xv[32];
        xl(r, c, xv);
        float xs0 = 0.0f, xs1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j += 2) { xs0 += xv[j]; xs1 += xv[j + 1]; }
        const float xs = xs0 + xs1;
        const float qx = chunk_dot<BITS>(q[r], xv, qmask);
        acc[r] = fmaf(D::ld(s16[r]), qx, fmaf(D::ld(b16[r]), xs, acc[r]));
      }
    } else {
      float xv[32];
      xl(0, c, xv);
      float xs0 = 0.0f, xs1 = 0.0f;
#pragma unroll
      for (int j = 0; j < 32; j += 2) { xs0 += xv[j]; xs1 += xv[j + 1]; }
      const float xs = xs0 + xs1;
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float qx = chunk_dot<BITS>(q[r], xv, qmask);
        acc[r] = fmaf(D::ld(s16[r]), qx, fmaf(D::ld(b16[r]), xs, acc[r]));
      }
    }
    if (cn < chunks) {
#pragma unroll
      for (int r = 0; r < R; r++) {
#pragma unroll
        for (int i = 0; i < BITS; i++) q[r][i] = qn[r][i];
        s16[r] = sn[r];
        b16[r] = bn[r];
      }
    }
  }
}

template <class D, int BITS, int GS, int R>
__device__ __forceinline__ void qmv_impl(const u32* __restrict__ w, const typename D::T* __restrict__ scales,
                                         const typename D::T* __restrict__ biases, const typename D::T* __restrict__ x,
                                         typename D::T* __restrict__ y, const u32* __restrict__ ids, int N, int K,
                                         int x_stride, u32 qmask, const typename D::T* __restrict__ residual) {
  // Plain matrices: the weights are prefetched before waiting for the previous kernel.
  const bool late_dep = ids == 0;
  if (!late_dep) ZMLX_GRID_DEP();
  const int slot = blockIdx.y;
  const long long words_per_row = (long long)K * BITS / 32;
  const int groups = K / GS;
  const int chunks = K >> 5;
  if (ids != 0) {
    const u32 e = ids[slot];
    w += (long long)e * N * words_per_row;
    scales += (long long)e * N * groups;
    biases += (long long)e * N * groups;
  }
  x += (long long)slot * x_stride;
  y += (long long)slot * N;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
  if (row0 >= N) return;
  float acc[R];
  const u32* wr[R];
  const typename D::T* sr[R];
  const typename D::T* br[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    int row = min(row0 + r, N - 1);
    wr[r] = w + row * words_per_row;
    sr[r] = scales + (long long)row * groups;
    br[r] = biases + (long long)row * groups;
  }
  const typename D::T* xr[1] = {x};
  qmv_lane_partials<D, BITS, GS, R, false>(wr, sr, br, XGlobal<D>{xr}, chunks, lane, qmask, acc, late_dep);
#pragma unroll
  for (int r = 0; r < R; r++) {
    float v = warp_sum(acc[r]);
    // Optional residual epilogue, as the unfused add: r(res + r(v)).
    if (lane == 0 && row0 + r < N)
      y[row0 + r] = residual ? D::st(__fadd_rn(D::ld(residual[row0 + r]), D::rnd(v))) : D::st(v);
  }
}

#define ZMLX_QMV(DT, DN, BITS, GS, R)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) qmv_##DN##_b##BITS##_g##GS##_r##R(                     \
      const u32* w, const DT::T* scales, const DT::T* biases, const DT::T* x, DT::T* y, const u32* ids,    \
      int N, int K, int x_stride, u32 qmask, const DT::T* residual) {                                      \
    qmv_impl<DT, BITS, GS, R>(w, scales, biases, x, y, ids, N, K, x_stride, qmask, residual);              \
  }
#define ZMLX_QMV_R(DT, DN, BITS, GS) ZMLX_QMV(DT, DN, BITS, GS, 1) ZMLX_QMV(DT, DN, BITS, GS, 4)
#define ZMLX_QMV_G(DT, DN, BITS) ZMLX_QMV_R(DT, DN, BITS, 32) ZMLX_QMV_R(DT, DN, BITS, 64) ZMLX_QMV_R(DT, DN, BITS, 128)
#define ZMLX_QMV_ALL(DT, DN)                                                                               \
  ZMLX_QMV_G(DT, DN, 2) ZMLX_QMV_G(DT, DN, 3) ZMLX_QMV_G(DT, DN, 4) ZMLX_QMV_G(DT, DN, 5)                 \
  ZMLX_QMV_G(DT, DN, 6) ZMLX_QMV_G(DT, DN, 8)
