// Quantized matrix-vector products on MLX affine-quantized weights.
//
// W [N, K] (optionally stacked [E, N, K] for MoE experts). Codes of a row form a
// little-endian bit stream (code j at bits [j*BITS, (j+1)*BITS)), which covers both the
// u32 LSB-first packing of 2/4/8 bits and MLX's byte layouts for 3/5/6 bits. A run of
// 32 codes is exactly BITS u32 words, and lies in one quantization group (GS >= 32).
//
// Contract: y[n] = round_dtype( sum_groups( s*sum(q*x) + b*sum(x) ) ), every product
// and sum in f32 (FMA allowed): f32 accumulation, output rounded once to the dtype.
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

// Code j (0..31, compile-time after unrolling) of a 32-code chunk, as an exact float.
template <int BITS, int J> __device__ __forceinline__ float code_at(const u32* q) {
  const int bp = J * BITS, wi = bp >> 5, off = bp & 31;
  u32 v = q[wi] >> off;
  if (off + BITS > 32) v |= q[wi + 1] << (32 - off);
  v &= (1u << BITS) - 1u;
  // 2^23 + v as a float, minus 2^23: exact, and cheaper than an int->float convert.
  return __fsub_rn(__uint_as_float(v | 0x4b000000u), 8388608.0f);
}

template <int BITS, int J> struct ChunkDot {
  static __device__ __forceinline__ float run(const u32* q, const float* xv, float acc) {
    acc = fmaf(code_at<BITS, J>(q), xv[J], acc);
    return ChunkDot<BITS, J + 1>::run(q, xv, acc);
  }
};
template <int BITS> struct ChunkDot<BITS, 32> {
  static __device__ __forceinline__ float run(const u32*, const float*, float acc) { return acc; }
};

template <class D, int BITS, int GS, int R>
__device__ __forceinline__ void qmv_impl(const u32* __restrict__ w, const typename D::T* __restrict__ scales,
                                         const typename D::T* __restrict__ biases, const typename D::T* __restrict__ x,
                                         typename D::T* __restrict__ y, const u32* __restrict__ ids, int N, int K,
                                         int x_stride) {
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
    acc[r] = 0.0f;
    int row = min(row0 + r, N - 1);
    wr[r] = w + row * words_per_row;
    sr[r] = scales + (long long)row * groups;
    br[r] = biases + (long long)row * groups;
  }
  for (int c = lane; c < chunks; c += 32) {
    u32 q[R][BITS];
#pragma unroll
    for (int r = 0; r < R; r++) load_words<BITS>(wr[r] + (long long)c * BITS, q[r]);
    const int g = (c * 32) / GS;
    float s[R], b[R];
#pragma unroll
    for (int r = 0; r < R; r++) { s[r] = D::ld(sr[r][g]); b[r] = D::ld(br[r][g]); }
    float xv[32];
#pragma unroll
    for (int i = 0; i < 4; i++) load8<D>(x + c * 32 + 8 * i, xv + 8 * i);
    float xs = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; j++) xs += xv[j];
#pragma unroll
    for (int r = 0; r < R; r++) {
      float qx = ChunkDot<BITS, 0>::run(q[r], xv, 0.0f);
      acc[r] = fmaf(s[r], qx, fmaf(b[r], xs, acc[r]));
    }
  }
#pragma unroll
  for (int r = 0; r < R; r++) {
    float v = warp_sum(acc[r]);
    if (lane == 0 && row0 + r < N) y[row0 + r] = D::st(v);
  }
}

#define ZMLX_QMV(DT, DN, BITS, GS, R)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) qmv_##DN##_b##BITS##_g##GS##_r##R(                     \
      const u32* w, const DT::T* scales, const DT::T* biases, const DT::T* x, DT::T* y, const u32* ids,    \
      int N, int K, int x_stride) {                                                                        \
    qmv_impl<DT, BITS, GS, R>(w, scales, biases, x, y, ids, N, K, x_stride);                               \
  }
#define ZMLX_QMV_R(DT, DN, BITS, GS) ZMLX_QMV(DT, DN, BITS, GS, 1) ZMLX_QMV(DT, DN, BITS, GS, 4)
#define ZMLX_QMV_G(DT, DN, BITS) ZMLX_QMV_R(DT, DN, BITS, 32) ZMLX_QMV_R(DT, DN, BITS, 64) ZMLX_QMV_R(DT, DN, BITS, 128)
#define ZMLX_QMV_ALL(DT, DN)                                                                               \
  ZMLX_QMV_G(DT, DN, 2) ZMLX_QMV_G(DT, DN, 3) ZMLX_QMV_G(DT, DN, 4) ZMLX_QMV_G(DT, DN, 5)                 \
  ZMLX_QMV_G(DT, DN, 6) ZMLX_QMV_G(DT, DN, 8)
