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
                                         const typename D::T* __restrict__ biases, const typename D::T* x,
                                         typename D::T* __restrict__ y, const u32* ids, int N, int K,
                                         int x_stride, u32 qmask, const typename D::T* residual) {
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

// ---- Tensor-core row dots: 4-bit weights, bf16/f16 x (sm_80+; the "tc4" path) ----
// The loop above spends ~3 instructions per code (extract, exponent trick, FMA) plus x
// conversions and sums; ncu showed decode's matvecs issue-bound (0.2 warp-instructions per
// code, schedulers 43-59% busy, DRAM 19-36%). Here two codes become a bf16x2/f16x2 pair in
// 2-3 instructions (mask under an exponent, then an exact fma that removes it) and mma.sync
// does the products (ncu, swiglu shape: 0.16 warp-instructions per code with tile set-up and
// reductions, vs 0.21). It measured faster only for the lm_head and short rows (K <= 1024),
// so the host uses it there (docs/kernels.md, "Fifth pass").
//
// Contract of a row's value on this path (every kernel that uses it computes rows exactly
// this way, so fused and unfused results stay bitwise equal): the row's 32-code chunks are
// cut into slices of TC_SLICE chunks (one warp's share), a slice into steps of 4 chunks.
// Per step, for each chunk c: d_c = sum q_j x_j and xs_c = sum x_j from the tensor cores
// (products exact: q < 16, x in the dtype; f32 accumulation inside the MMA), then
// acc = fma(s_c, d_c, fma(b_c, xs_c, acc)) with chunks 0,1 of every step in accumulator A
// and chunks 2,3 in accumulator B (step order); slice = A + B; row = slice 0 + slice 1 + ...
// in order. One rounding to the dtype at the end, as qmv. Host: `ops::uses_tc4`.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define ZMLX_TC 1
#else
#define ZMLX_TC 0
#endif
#define TC_SLICE 16       // chunks of 32 codes per slice
#define TC_MAX_SLICES 64  // K <= 64 * 16 * 32 = 32768 (ops::TC4_MAX_K)
#define TC_MAX_WARPS 16

// Pair constants: MAGIC = (M, M) with M = 2^(mantissa bits), so (MAGIC | q) = M + q exactly;
// fma(v, 1, -M) = q exactly.
template <class D> struct Tc;
// PT: the PTX element type of the dtype (bf16 / f16).
#if ZMLX_TC
#define ZMLX_TC_OPS(PT)                                                                                  \
  static __device__ __forceinline__ u32 unmagic(u32 v) {                                                 \
    u32 r;                                                                                               \
    asm("fma.rn." #PT "x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(ONE), "r"(NEG));                     \
    return r;                                                                                            \
  }                                                                                                      \
  static __device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) { \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." #PT "." #PT ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1)); \
  }
#else  // the host never takes this path below sm_80
#define ZMLX_TC_OPS(PT)                                                                                  \
  static __device__ __forceinline__ u32 unmagic(u32) { __trap(); return 0u; }                           \
  static __device__ __forceinline__ void mma(float*, u32, u32, u32, u32, u32, u32) { __trap(); }
#endif
template <> struct Tc<DtBF16> {
  static constexpr u32 MAGIC = 0x43004300u, NEG = 0xC300C300u, ONE = 0x3F803F80u;
  ZMLX_TC_OPS(bf16)
};
template <> struct Tc<DtF16> {
  static constexpr u32 MAGIC = 0x64006400u, NEG = 0xE400E400u, ONE = 0x3C003C00u;
  ZMLX_TC_OPS(f16)
};
#undef ZMLX_TC_OPS

// Codes I and I+4 of a 4-bit word as a (low, high) pair in the dtype.
template <class D, int I> __device__ __forceinline__ u32 code_pair(u32 w) {
  return Tc<D>::unmagic(((w >> (4 * I)) & 0x000F000Fu) | Tc<D>::MAGIC);
}
__device__ __forceinline__ u32 word_of(const uint4& v, int m) { return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w; }

// The two rows of a 16-row tile that lane 4g + t feeds to the MMAs: g and g + 8.
template <class D> struct TcRows {
  const u32* w[2];
  const typename D::T* s[2];
  const typename D::T* b[2];
  const typename D::T* x;
};
// Rows row0 + g and row0 + g + 8 of W [N, K] (clamped to N - 1: their results are not stored).
template <class D, int GS>
__device__ __forceinline__ TcRows<D> tc_rows(const u32* w, const typename D::T* sc, const typename D::T* bi,
                                             const typename D::T* x, int N, int K, int row0) {
  const int g = (threadIdx.x & 31) >> 2;
  TcRows<D> r;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const long long row = min(row0 + g + 8 * h, N - 1);
    r.w[h] = w + row * (K / 8);
    r.s[h] = sc + row * (K / GS);
    r.b[h] = bi + row * (K / GS);
  }
  r.x = x;
  return r;
}

// x of chunk c as 16 words (the B operand's source), from global memory (coherent loads: x
// may come from the previous kernel) or from shared memory.
template <bool SHARED> __device__ __forceinline__ void tc4_x_words(const void* x, int c, u32* xw) {
  const uint4* p = reinterpret_cast<const uint4*>(x) + 4 * c;  // 32 codes = 64 bytes of x
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const uint4 v = SHARED ? p[q] : ld_act16(p + q);
    xw[4 * q] = v.x; xw[4 * q + 1] = v.y; xw[4 * q + 2] = v.z; xw[4 * q + 3] = v.w;
  }
}

// Scales and biases of the step's chunks 2t, 2t + 1 for rows g, g + 8 ([row][j]); zeros where
// a lane does not use them.
template <class D, int GS>
__device__ __forceinline__ void tc4_step_affine(const TcRows<D>& R, int cs, int c1, typename D::T sc[2][2], typename D::T bc[2][2]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; h++) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int cc = cs + 2 * t + j;
      if (GS >= 64 && j == 1) {  // chunks 2t and 2t + 1 share a group
        sc[h][1] = sc[h][0];
        bc[h][1] = bc[h][0];
      } else {
        sc[h][j] = bc[h][j] = 0;
        if (t < 2 && cc < c1) {
          sc[h][j] = R.s[h][(cc * 32) / GS];
          bc[h][j] = R.b[h][(cc * 32) / GS];
        }
      }
    }
  }
}

// The arithmetic of one step (chunks cs .. cs + 3) of a 16-row tile: w0, w1 = the lane's chunk
// words of rows g and g + 8, xw = x of chunk cs + g on lanes with g == t (zeros elsewhere).
template <class D>
__device__ __forceinline__ void tc4_step(const uint4& w0q, const uint4& w1q, const u32* xw, const typename D::T sc[2][2],
                                         const typename D::T bc[2][2], int cs, int c1, float* acc) {
  const int t = threadIdx.x & 3;
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int m = 0; m < 4; m++) {  // word m: codes 8m..8m+7 of the lane's chunk
    const u32 w0 = word_of(w0q, m), w1 = word_of(w1q, m);
    const u32 lo0 = __byte_perm(xw[4 * m], xw[4 * m + 2], 0x5410);      // x 8m, 8m+4
    const u32 lo1 = __byte_perm(xw[4 * m], xw[4 * m + 2], 0x7632);      // x 8m+1, 8m+5
    const u32 hi0 = __byte_perm(xw[4 * m + 1], xw[4 * m + 3], 0x5410);  // x 8m+2, 8m+6
    const u32 hi1 = __byte_perm(xw[4 * m + 1], xw[4 * m + 3], 0x7632);  // x 8m+3, 8m+7
    Tc<D>::mma(d, code_pair<D, 0>(w0), code_pair<D, 0>(w1), code_pair<D, 1>(w0), code_pair<D, 1>(w1), lo0, lo1);
    Tc<D>::mma(d, code_pair<D, 2>(w0), code_pair<D, 2>(w1), code_pair<D, 3>(w0), code_pair<D, 3>(w1), hi0, hi1);
    Tc<D>::mma(xs, Tc<D>::ONE, Tc<D>::ONE, Tc<D>::ONE, Tc<D>::ONE, lo0, lo1);
    Tc<D>::mma(xs, Tc<D>::ONE, Tc<D>::ONE, Tc<D>::ONE, Tc<D>::ONE, hi0, hi1);
  }
  // Lane (g, t < 2) holds columns 2t, 2t + 1 = chunks 2t, 2t + 1 of the step.
  if (t < 2) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      if (cs + 2 * t + j < c1) {
#pragma unroll
        for (int h = 0; h < 2; h++)
          acc[h] = fmaf(D::ld(sc[h][j]), d[2 * h + j], fmaf(D::ld(bc[h][j]), xs[j], acc[h]));
      }
    }
  }
}
__device__ __forceinline__ float2 tc4_pair_sum(const float* acc) {
  return make_float2(acc[0] + __shfl_xor_sync(0xffffffffu, acc[0], 1), acc[1] + __shfl_xor_sync(0xffffffffu, acc[1], 1));
}

// One warp: the partial dots of a 16-row tile over chunks [c0, c1) (c1 - c0 <= TC_SLICE).
// Weight, scale and bias loads of the whole slice are issued first; then `after` (the
// dependency wait, see after_first_load); then x is read (x may come from the previous kernel).
// Returns (row g, row g + 8) in the lanes with t == 0.
template <class D, int GS, class After>
__device__ __forceinline__ float2 tc4_slice(const TcRows<D>& R, int c0, int c1, const After& after) {
  typedef typename D::T T;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint4 wq[4][2];
  T sc[4][2][2], bc[4][2][2];  // [step][row][chunk 2t + j of the step]
#pragma unroll
  for (int s = 0; s < 4; s++) {
    const int c = c0 + 4 * s + t;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      wq[s][h] = make_uint4(0u, 0u, 0u, 0u);
      if (c < c1) wq[s][h] = __ldg(reinterpret_cast<const uint4*>(R.w[h]) + c);
    }
    tc4_step_affine<D, GS>(R, c0 + 4 * s, c1, sc[s], bc[s]);
  }
  after_first_load(after);
  const T* x = R.x;
  ZMLX_AFTER_DEP(x);
  float acc[2] = {0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < 4; s++) {
    if (c0 + 4 * s >= c1) break;
    const int c = c0 + 4 * s + t;
    // The B operand: column n carries x of chunk n of the step (lane (n, n) supplies it; the
    // other lanes supply zeros), so the MMA keeps the four chunks' dots apart.
    u32 xw[16];
#pragma unroll
    for (int i = 0; i < 16; i++) xw[i] = 0u;
    if (g == t && c < c1) tc4_x_words<false>(x, c, xw);
    tc4_step<D>(wq[s][0], wq[s][1], xw, sc[s], bc[s], c0 + 4 * s, c1, acc);
  }
  return tc4_pair_sum(acc);
}

// tc4_slice with the tile's weights, scales, biases and x in shared memory (R's pointers are
// shared-memory addresses): the same arithmetic, one step's operands loaded at a time.
template <class D, int GS>
__device__ __forceinline__ float2 tc4_slice_shared(const TcRows<D>& R, int c0, int c1) {
  typedef typename D::T T;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float acc[2] = {0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < 4; s++) {
    if (c0 + 4 * s >= c1) break;
    const int c = c0 + 4 * s + t;
    uint4 wq[2];
#pragma unroll
    for (int h = 0; h < 2; h++) wq[h] = c < c1 ? reinterpret_cast<const uint4*>(R.w[h])[c] : make_uint4(0u, 0u, 0u, 0u);
    T sc[2][2], bc[2][2];
    tc4_step_affine<D, GS>(R, c0 + 4 * s, c1, sc, bc);
    u32 xw[16];
#pragma unroll
    for (int i = 0; i < 16; i++) xw[i] = 0u;
    if (g == t && c < c1) tc4_x_words<true>(R.x, c, xw);
    tc4_step<D>(wq[0], wq[1], xw, sc, bc, c0 + 4 * s, c1, acc);
  }
  return tc4_pair_sum(acc);
}

// A block's warps walk the (item, slice) pairs of `items` tiles (rows(i) gives item i's
// TcRows: a matrix, an expert, a slot), each slice's partials into part[(i * slices + s) * 16 + r].
// The first pair of each warp runs `after` once its loads are issued. The caller syncs.
// SHARED: the tiles are in shared memory (tc4_slice_shared; `dep` does not apply).
template <class D, int GS, bool SHARED = false, class RowsOf>
__device__ __forceinline__ void tc4_block(int items, int chunks, const RowsOf& rows, bool dep, float* part) {
  const int slices = (chunks + TC_SLICE - 1) / TC_SLICE;
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int p = warp; p < items * slices; p += nw) {
    const int i = p / slices, s = p % slices, c0 = s * TC_SLICE, c1 = min(chunks, (s + 1) * TC_SLICE);
    float2 v;
    if constexpr (SHARED) v = tc4_slice_shared<D, GS>(rows(i), c0, c1);
    else v = tc4_slice<D, GS>(rows(i), c0, c1, dep && p == warp);
    if ((lane & 3) == 0) {
      part[p * 16 + (lane >> 2)] = v.x;
      part[p * 16 + (lane >> 2) + 8] = v.y;
    }
  }
}
// Row r of item i: its slices summed in order (the contract's last step).
__device__ __forceinline__ float tc4_row(const float* part, int i, int slices, int r) {
  const float* p = part + i * slices * 16 + r;
  float v = p[0];
  for (int s = 1; s < slices; s++) v += p[s * 16];
  return v;
}

// qmv / gather_qmv / qmv_add on the tc4 path: block = one 16-row tile (of slot blockIdx.y),
// its warps over the slices. Same arguments and semantics as qmv_impl.
template <class D, int GS>
__device__ __forceinline__ void qmv_tc_impl(const u32* __restrict__ w, const typename D::T* __restrict__ scales,
                                            const typename D::T* __restrict__ biases, const typename D::T* x,
                                            typename D::T* __restrict__ y, const u32* ids, int N, int K,
                                            int x_stride, const typename D::T* residual) {
  __shared__ float part[TC_MAX_SLICES * 16];
  const bool late_dep = ids == 0;  // plain matrices: weights requested before the wait
  if (!late_dep) ZMLX_GRID_DEP();
  const int slot = blockIdx.y, chunks = K >> 5, row0 = blockIdx.x * 16;
  if (ids != 0) {
    const long long e = ids[slot];
    w += e * N * (K / 8);
    scales += e * N * (K / GS);
    biases += e * N * (K / GS);
  }
  x += (long long)slot * x_stride;
  y += (long long)slot * N;
  tc4_block<D, GS>(1, chunks, [&](int) { return tc_rows<D, GS>(w, scales, biases, x, N, K, row0); }, late_dep, part);
  if (late_dep) ZMLX_GRID_DEP();  // (again: every thread has waited before reading residual)
  __syncthreads();
  const int r = threadIdx.x;
  if (r < 16 && row0 + r < N) {
    const float v = tc4_row(part, 0, (chunks + TC_SLICE - 1) / TC_SLICE, r);
    y[row0 + r] = residual ? D::st(__fadd_rn(D::ld(residual[row0 + r]), D::rnd(v))) : D::st(v);
  }
}

#define ZMLX_QMV_TC1(DT, DN, GS)                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * TC_MAX_WARPS) qmv_tc_##DN##_g##GS(                     \
      const u32* w, const DT::T* scales, const DT::T* biases, const DT::T* x, DT::T* y, const u32* ids,    \
      int N, int K, int x_stride, const DT::T* residual) {                                                 \
    qmv_tc_impl<DT, GS>(w, scales, biases, x, y, ids, N, K, x_stride, residual);                           \
  }
#define ZMLX_QMV_TC(DT, DN) ZMLX_QMV_TC1(DT, DN, 32) ZMLX_QMV_TC1(DT, DN, 64) ZMLX_QMV_TC1(DT, DN, 128)
