// zmlx-cuda common device code. No #include: NVRTC's builtins only, so the
// catalog compiles with nothing but libnvrtc (CI uses the PyPI wheel).
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define ZMLX_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90+; the runtime sets the launch attribute only there):
// every kernel first waits until the kernel before it in the stream has completed and its
// writes are visible, then lets the next kernel's blocks be scheduled, so launch latency
// overlaps the previous kernel's tail and results are unchanged.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define ZMLX_GRID_DEP() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define ZMLX_GRID_DEP()
#endif
// Data an earlier kernel wrote (activations, KV caches) is read with the coherent loads below,
// never the non-coherent path (__ldg, ld.global.nc): under programmatic dependent launch a .nc
// load placed after griddepcontrol.wait could still return data from before the earlier
// kernel's writes (a decode whose x loads were .nc disagreed run to run; with ld.global.ca or
// .cg it agreed: docs/kernels.md, "The PDL hazard"). asm volatile keeps them after the wait
// (itself volatile). Weights, which nothing writes, keep __ldg. ZMLX_AFTER_DEP additionally
// routes such pointers through an empty asm after the wait (older guard, kept: free).
__device__ __forceinline__ uint4 ld_act16(const void* p) {
  uint4 v;
  asm volatile("ld.global.ca.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_act8(const void* p) {
  uint2 v;
  asm volatile("ld.global.ca.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 ld_act4(const void* p) {
  u32 v;
  asm volatile("ld.global.ca.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
#define ZMLX_AFTER_DEP(p) asm volatile("" : "+l"(p))
// L2-only load (bypasses L1, which is not coherent between SMs): data other blocks of the
// same kernel wrote before a grid barrier.
__device__ __forceinline__ uint4 ld_cg16(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
// One element, L2 only (u16 for bf16/f16, f32).
__device__ __forceinline__ u16 ld_cg_elem(const u16* p) {
  u16 v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ float ld_cg_elem(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}
// Asynchronous 16-byte copy global -> shared (sm_80+; L2 only, coherent); with !valid it
// writes 16 zero bytes and reads nothing. cp_async_wait_all: wait for all of a thread's copies.
__device__ __forceinline__ void cp_async16_zfill(void* dst_shared, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  const u32 a = (u32)__cvta_generic_to_shared(dst_shared);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  *reinterpret_cast<uint4*>(dst_shared) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async16(void* dst_shared, const void* src) { cp_async16_zfill(dst_shared, src, true); }
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
#endif
}
// Grid-wide barrier for kernels whose blocks are all resident at once (the host sizes the grid
// with the occupancy API). *bar counts arrivals and only grows: a call's target is the next
// multiple of gridDim.x above the count its block found, so the counter needs zeroing once,
// never between calls or graph replays, as long as every kernel using it has the same grid
// size. One atomic per block, then a spin on the same word (acquire). Writes of every block
// before the barrier are visible to every block after it; read them with ld_cg16 or plain
// loads, never ld.global.nc.
__device__ __forceinline__ void grid_barrier(u64* bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const u64 g = gridDim.x;
    const u64 target = (atomicAdd(reinterpret_cast<unsigned long long*>(bar), 1ull) / g + 1) * g;
    u64 cur;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(cur) : "l"(bar) : "memory");
    } while (cur < target);
    __threadfence();  // as cooperative groups' grid sync: the block's later loads see every write
  }
  __syncthreads();
}

// ---- dtype conversions by bit operations (RNE, like MLX) ----
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;  // canonical quiet NaN
  u += ((u >> 16) & 1u) + 0x7fffu;
  return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
  u32 sign = ((u32)h & 0x8000u) << 16;
  u32 e = ((u32)h >> 10) & 0x1fu;
  u32 m = (u32)h & 0x3ffu;
  if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0u) {
    float v = __fmul_rn((float)m, 5.9604644775390625e-8f);  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
  u32 x = __float_as_uint(f);
  u32 sign = (x >> 16) & 0x8000u;
  u32 ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u);        // NaN
  if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);       // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                      // f16 subnormal / zero
    float t = __fadd_rn(__uint_as_float(ax), 0.5f);            // RNE at 2^-24 by the adder
    return (u16)(sign | (__float_as_uint(t) - 0x3f000000u));
  }
  u32 odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;                                     // rebias exponent, round to even
  return (u16)(sign | (ax >> 13));
}

struct DtBF16 {
  typedef u16 T;
  static __device__ __forceinline__ float ld(T v) { return bf16_to_f32(v); }
  static __device__ __forceinline__ T st(float f) { return f32_to_bf16(f); }
  static __device__ __forceinline__ float rnd(float f) { return bf16_to_f32(f32_to_bf16(f)); }
};
struct DtF16 {
  typedef u16 T;
  static __device__ __forceinline__ float ld(T v) { return f16_to_f32(v); }
  static __device__ __forceinline__ T st(float f) { return f32_to_f16(f); }
  static __device__ __forceinline__ float rnd(float f) { return f16_to_f32(f32_to_f16(f)); }
};
struct DtF32 {
  typedef float T;
  static __device__ __forceinline__ float ld(T v) { return v; }
  static __device__ __forceinline__ T st(float f) { return f; }
  static __device__ __forceinline__ float rnd(float f) { return f; }
};

// 8 consecutive 16-bit values (one 16-byte word) as floats.
template <class D> __device__ __forceinline__ void unpack8(const uint4& v, float* out);
template <> __device__ __forceinline__ void unpack8<DtBF16>(const uint4& v, float* out) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) { out[2*i] = __uint_as_float(w[i] << 16); out[2*i+1] = __uint_as_float(w[i] & 0xffff0000u); }
}
template <> __device__ __forceinline__ void unpack8<DtF16>(const uint4& v, float* out) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) { out[2*i] = f16_to_f32((u16)(w[i] & 0xffffu)); out[2*i+1] = f16_to_f32((u16)(w[i] >> 16)); }
}
template <> __device__ __forceinline__ void unpack8<DtF32>(const uint4&, float*) { __trap(); }
// Load 8 consecutive values (16-bit dtypes: one 16-byte load; f32: two).
template <class D> __device__ __forceinline__ void load8(const typename D::T* p, float* out);
template <> __device__ __forceinline__ void load8<DtBF16>(const u16* p, float* out) { unpack8<DtBF16>(ld_act16(p), out); }
template <> __device__ __forceinline__ void load8<DtF16>(const u16* p, float* out) { unpack8<DtF16>(ld_act16(p), out); }
template <> __device__ __forceinline__ void load8<DtF32>(const float* p, float* out) {
  const uint4 a = ld_act16(p), b = ld_act16(p + 4);
  out[0] = __uint_as_float(a.x); out[1] = __uint_as_float(a.y); out[2] = __uint_as_float(a.z); out[3] = __uint_as_float(a.w);
  out[4] = __uint_as_float(b.x); out[5] = __uint_as_float(b.y); out[6] = __uint_as_float(b.z); out[7] = __uint_as_float(b.w);
}

// ---- MLX's CPU transcendental polynomials (mlx/backend/cpu/simd/math.h) ----
// Explicit _rn intrinsics: NVRTC would otherwise contract a*b+c into FMA.
__device__ __forceinline__ float mlx_exp(float x_init) {
  float x = __fmul_rn(x_init, 1.442695f);
  float ipart = floorf(__fadd_rn(x, 0.5f));
  float fpart = __fsub_rn(x, ipart);
  float p = 1.535336188319500e-4f;
  p = __fmaf_rn(p, fpart, 1.339887440266574e-3f);
  p = __fmaf_rn(p, fpart, 9.618437357674640e-3f);
  p = __fmaf_rn(p, fpart, 5.550332471162809e-2f);
  p = __fmaf_rn(p, fpart, 2.402264791363012e-1f);
  p = __fmaf_rn(p, fpart, 6.931472028550421e-1f);
  p = __fmaf_rn(p, fpart, 1.000000000000000f);
  int ip = (fabsf(x_init) <= 88.0f) ? (int)ipart : 0;
  u32 epart = ((u32)(ip + 127)) << 23;
  float result = (x_init != x_init) ? x_init : __fmul_rn(__uint_as_float(epart), p);
  if (x_init > 88.0f) result = ZMLX_INF;
  if (x_init < -88.0f) result = 0.0f;
  return result;
}

template <bool SINE> __device__ __forceinline__ float mlx_sincos(float input) {
  bool sign_sin = input < 0.0f;
  float x = fabsf(input);
  float y = __fmul_rn(x, 1.27323954473516f);
  u32 emm2 = (u32)y;
  emm2 = (emm2 + 1u) & ~1u;
  y = (float)emm2;
  bool poly_mask = (emm2 & 2u) != 0u;
  x = __fmaf_rn(y, -0.78515625f, x);
  x = __fmaf_rn(y, -2.4187564849853515625e-4f, x);
  x = __fmaf_rn(y, -3.77489497744594108e-8f, x);
  sign_sin ^= (emm2 & 4u) != 0u;
  bool sign_cos = ((emm2 - 2u) & 4u) != 0u;
  float z = __fmul_rn(x, x);
  float y1 = __fmaf_rn(z, 2.443315711809948e-5f, -1.388731625493765e-3f);
  float y2 = __fmaf_rn(z, -1.9515295891e-4f, 8.3321608736e-3f);
  y1 = __fmaf_rn(y1, z, 4.166664568298827e-2f);
  y2 = __fmaf_rn(y2, z, -1.6666654611e-1f);
  y1 = __fmul_rn(y1, z);
  y2 = __fmul_rn(y2, z);
  y1 = __fmul_rn(y1, z);
  y2 = __fmaf_rn(x, y2, x);
  y1 = __fmaf_rn(z, -0.5f, y1);
  y1 = __fadd_rn(y1, 1.0f);
  if (SINE) {
    float ys = poly_mask ? y1 : y2;
    return sign_sin ? -ys : ys;
  } else {
    float yc = poly_mask ? y2 : y1;
    return sign_cos ? yc : -yc;
  }
}
__device__ __forceinline__ float mlx_sin(float x) { return fabsf(x) > 8388608.0f ? sinf(x) : mlx_sincos<true>(x); }
__device__ __forceinline__ float mlx_cos(float x) { return fabsf(x) > 8388608.0f ? cosf(x) : mlx_sincos<false>(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide sum/max; `red` is >= 32 floats of shared memory. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.0f;
  return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -ZMLX_INF;
  return warp_max(t);
}

// ---- Thread block clusters (sm_90+): a barrier over the cluster's blocks with release /
// acquire ordering, and a store into block 0's shared memory (distributed shared memory).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ u32 rank0_shared_addr(const void* p) {
  u64 a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  u32 r;
  asm("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(r) : "r"((u32)a));
  return r;
}
__device__ __forceinline__ void st_rank0(u16* p, u16 v) {
  asm volatile("st.shared::cluster.u16 [%0], %1;" ::"r"(rank0_shared_addr(p)), "h"(v) : "memory");
}
__device__ __forceinline__ void st_rank0(float* p, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(rank0_shared_addr(p)), "f"(v) : "memory");
}
#else  // the host never launches a cluster below sm_90
__device__ __forceinline__ void cluster_sync() { __trap(); }
template <class T> __device__ __forceinline__ void st_rank0(T*, T) { __trap(); }
#endif
