// Fused decode kernels for the `patch` patterns. Compiled after common.cuh, qmv.cu and
// ops.cu (templates only): they reuse qmv_lane_partials, so every dot product is bitwise
// the one qmv computes (same lane -> chunk mapping, same FMA order, same warp_sum tree),
// and softmax_topk_impl itself for the router tail.
//
// THE RULE: each kernel's outputs are bitwise identical to the unfused launch sequence
// it replaces (docs/kernels.md, "Fused MoE kernels"). Every intermediate the unfused
// chain stores in the dtype is rounded to the dtype here at the same point.

// swiglu on values already rounded to the dtype (exactly swiglu_impl in ops.cu).
template <class D> __device__ __forceinline__ typename D::T swiglu_val(float gv, float uv) {
  const float e = D::rnd(mlx_exp(fabsf(gv)));
  const float yv = __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
  const float s = D::rnd(gv < 0.0f ? yv : __fsub_rn(1.0f, yv));
  const float silu = D::rnd(__fmul_rn(gv, s));
  return D::st(__fmul_rn(silu, uv));
}

// moe_topk_experts: a block routes itself from the router logits [E] with softmax_topk's warp
// code (warp 0; E <= 32 * STK_PER, k <= 32, probabilities rounded to the dtype), so no top-k
// launch runs between the router and the experts: ids_sh[0..k) and, when w_sh != 0, the
// weights, bitwise what softmax_topk writes. Round r depends on rounds < r only, so a block
// that needs slot s alone runs k = s + 1 rounds. Every thread of the block must call it.
template <class D>
__device__ __forceinline__ void route_block(const typename D::T* logits, int E, int k, int renorm, u32* ids_sh, float* w_sh) {
  __shared__ float pr[32 * STK_PER];
  if (threadIdx.x < 32) softmax_topk_warp<D, true>(logits, ids_sh, w_sh, E, k, 1, renorm, pr);
  __syncthreads();
}
// The expert of this block's slot (blockIdx.y): from ids, or routed in the block (logits != 0).
template <class D>
__device__ __forceinline__ long long slot_expert(const u32* ids, const typename D::T* logits, int E) {
  const int slot = blockIdx.y;
  if (logits == 0) return ids[slot];
  __shared__ u32 ids_sh[32];
  route_block<D>(logits, E, slot + 1, 0, ids_sh, 0);
  return ids_sh[slot];
}

// 1. gather_qmm_swiglu: act[slot, n] = swiglu(r(gate[e]·x)[n], r(up[e]·x)[n]), e = ids[slot].
// Replaces gather_qmv gate + gather_qmv up + swiglu. One warp: R gate rows and the same R up
// rows (2R dot products, loads of all in flight), x shared. blockIdx.y = slot.
// gqs_rows: one warp's rows row0 .. row0 + R - 1 of slot `slot` (expert e); also moe_experts' phase 1.
template <class D, int BITS, int GS, int R>
__device__ __forceinline__ void gqs_rows(const u32* __restrict__ wg, const typename D::T* __restrict__ sg,
                                         const typename D::T* __restrict__ bg, const u32* __restrict__ wu,
                                         const typename D::T* __restrict__ su, const typename D::T* __restrict__ bu,
                                         long long e, int slot, int row0, const typename D::T* x,
                                         typename D::T* act, int N, int K, u32 qmask) {
  const long long wpr = (long long)K * BITS / 32;
  const int groups = K / GS;
  const int chunks = K >> 5;
  const int lane = threadIdx.x & 31;
  const u32* wr[2 * R];
  const typename D::T* sr[2 * R];
  const typename D::T* br[2 * R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const long long row = e * N + min(row0 + r, N - 1);
    wr[r] = wg + row * wpr;
    sr[r] = sg + row * groups;
    br[r] = bg + row * groups;
    wr[R + r] = wu + row * wpr;
    sr[R + r] = su + row * groups;
    br[R + r] = bu + row * groups;
  }
  float acc[2 * R];
  const typename D::T* xr[1] = {x};
  qmv_lane_partials<D, BITS, GS, 2 * R, false>(wr, sr, br, XGlobal<D>{xr}, chunks, lane, qmask, acc);
#pragma unroll
  for (int r = 0; r < R; r++) {
    const float g = D::rnd(warp_sum(acc[r]));
    const float u = D::rnd(warp_sum(acc[R + r]));
    if (lane == r && row0 + r < N) act[(long long)slot * N + row0 + r] = swiglu_val<D>(g, u);
  }
}
template <class D, int BITS, int GS, int R>
__device__ __forceinline__ void gqs_impl(const u32* __restrict__ wg, const typename D::T* __restrict__ sg,
                                         const typename D::T* __restrict__ bg, const u32* __restrict__ wu,
                                         const typename D::T* __restrict__ su, const typename D::T* __restrict__ bu,
                                         const u32* ids, const typename D::T* logits, int E, const typename D::T* x,
                                         typename D::T* __restrict__ act, int N, int K, u32 qmask) {
  const long long e = slot_expert<D>(ids, logits, E);
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
  if (row0 >= N) return;
  gqs_rows<D, BITS, GS, R>(wg, sg, bg, wu, su, bu, e, blockIdx.y, row0, x, act, N, K, qmask);
}

// 2. gather_qmm_combine: out[n] = r(residual[n] + r(m)), m = moe_combine of the k slots
// y_j = r(down[e_j]·act_j)[n]: m = sum_f32 r(w_j * y_j) in list order from 0, rounded once
// (out = r(m) when residual == 0). Replaces gather_qmv down + moe_combine (+ add).
// Block: NW warps x R output rows; warp w computes the R rows of slots w, w+NW, ... with x =
// act_slot shared by its R rows (qmv's code), into shared memory; then R threads fold the
// k values of their row in slot order. Dynamic shared memory: k*R floats.
// Programmatic dependent launch: ids are read and the first expert weights requested before
// waiting for the previous kernel, so ids must come from an earlier kernel (the engine's
// order: top-k, gather_qmm_swiglu, this); act, wts and residual are read after the wait.
// Routed (logits != 0, moe_topk_experts): the block computes ids and weights from the logits
// (router two kernels back) before the wait; block 0 stores them to ids / wts (routing stats).
template <class D>
__device__ __forceinline__ void combine_route(u32*& ids, float*& wts, const typename D::T* logits, int E, int k,
                                              int renorm, u32* ids_sh, float* w_sh) {
  if (logits == 0) return;
  route_block<D>(logits, E, k, renorm, ids_sh, w_sh);
  if (blockIdx.x == 0 && threadIdx.x < k) { ids[threadIdx.x] = ids_sh[threadIdx.x]; wts[threadIdx.x] = w_sh[threadIdx.x]; }
  ids = ids_sh;
  wts = w_sh;
}
template <class D, int BITS, int GS, int R>
__device__ __forceinline__ void gqc_impl(const u32* __restrict__ w, const typename D::T* __restrict__ s,
                                         const typename D::T* __restrict__ b, u32* ids, float* wts,
                                         const typename D::T* logits, int E, int renorm, int k, const typename D::T* act,
                                         const typename D::T* residual, typename D::T* out, int N, int K, u32 qmask) {
  extern __shared__ float ys[];  // [k][R]
  __shared__ u32 ids_sh[32];
  __shared__ float w_sh[32];
  combine_route<D>(ids, wts, logits, E, k, renorm, ids_sh, w_sh);
  const long long wpr = (long long)K * BITS / 32;
  const int groups = K / GS;
  const int chunks = K >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const int n0 = blockIdx.x * R;
  for (int j = warp; j < k; j += nw) {
    const long long e = ids[j];
    const u32* wr[R];
    const typename D::T* sr[R];
    const typename D::T* br[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const long long row = e * N + min(n0 + r, N - 1);
      wr[r] = w + row * wpr;
      sr[r] = s + row * groups;
      br[r] = b + row * groups;
    }
    const typename D::T* xr[1] = {act + (long long)j * K};
    float acc[R];
    qmv_lane_partials<D, BITS, GS, R, false>(wr, sr, br, XGlobal<D>{xr}, chunks, lane, qmask, acc, true);
#pragma unroll
    for (int r = 0; r < R; r++) {
      const float y = D::rnd(warp_sum(acc[r]));
      if (lane == r) ys[j * R + r] = y;
    }
  }
  ZMLX_GRID_DEP();  // (again) for warps without a slot: wts and residual come next
  ZMLX_AFTER_DEP(wts);
  ZMLX_AFTER_DEP(residual);
  __syncthreads();
  const int t = threadIdx.x;
  if (t < R && n0 + t < N) {
    float m = 0.0f;
    for (int j = 0; j < k; j++) m = __fadd_rn(m, D::rnd(__fmul_rn(wts[j], ys[j * R + t])));
    out[n0 + t] = residual != 0 ? D::st(__fadd_rn(D::ld(residual[n0 + t]), D::rnd(m))) : D::st(m);
  }
}

// 3. add_rms_norm: h = r(x + delta) (stored), normed = rms_norm(h, w) with rms_norm's code
// (rms_norm_vals; same block size: the launcher mirrors ops::rms_norm). One row per block.
// In place allowed (h_out == x).
template <class D>
__device__ __forceinline__ void add_rms_norm_impl(const typename D::T* x, const typename D::T* delta,
                                                  const typename D::T* __restrict__ w, typename D::T* h_out,
                                                  typename D::T* __restrict__ y, int n, float eps, float inv_n) {
  __shared__ float red[32];
  x += (long long)blockIdx.x * n;
  delta += (long long)blockIdx.x * n;
  h_out += (long long)blockIdx.x * n;
  y += (long long)blockIdx.x * n;
  const int nt = blockDim.x;
  if (n <= 8 * nt) {  // rms_norm's register path on h
    float v[8], out[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * nt;
      v[j] = i < n ? D::rnd(__fadd_rn(D::ld(x[i]), D::ld(delta[i]))) : 0.0f;
      if (i < n) h_out[i] = D::st(v[j]);
    }
    rms_norm_vals<D>(v, w, n, eps, inv_n, red, out);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * nt;
      if (i < n) y[i] = D::st(out[j]);
    }
    return;
  }
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += nt) {
    const float v = D::rnd(__fadd_rn(D::ld(x[i]), D::ld(delta[i])));
    h_out[i] = D::st(v);
    ss = fmaf(v, v, ss);
  }
  ss = block_sum(ss, red);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
  for (int i = threadIdx.x; i < n; i += nt) {  // h_out[i] was written by this same thread
    const float v = D::rnd(__fmul_rn(D::ld(h_out[i]), r));
    y[i] = D::st(__fmul_rn(v, D::ld(w[i])));
  }
}

// 4. moe_gating: [post-attention RMSNorm +] router + softmax + top-k in one launch. Without
// nw, h is the normalised input and the router rows read it as qmv does. With nw, every block
// normalises h itself with rms_norm's register-path code (launched with rms_norm's thread
// count for K, so xn is bitwise rms_norm's), keeps xn in f32 in shared memory for its router
// rows (one per warp, qmv's per-row code, logits rounded to the dtype as qmv stores them),
// and block 0 also stores xn for the experts. Each warp requests its row's first weights
// before waiting for the previous kernel (the norm runs while they arrive). Then one block
// runs softmax_topk's exact code on the logits, with the same fast/general dispatch as the
// softmax_topk kernel. Which block, and how the logits get there:
//  - `cluster` (sm_90, the grid is one thread block cluster): every warp stores its logit
//    into block 0's shared memory; one cluster barrier; block 0 ranks them.
//  - otherwise: logits in ws + 16 B; the last block to finish (threadfence + counter at ws,
//    zero before the first call, left zero) ranks them.
// Replaces rms_norm + qmv + softmax_topk. Dynamic shared memory: max(K, E) floats with the
// norm, E without (then E logits in the dtype with `cluster`).
// With logits_out (norm_router), the logits go there and the kernel ends: rms_norm + router
// qmv in one launch, bitwise the two kernels, and no grid-wide handoff.
template <class D, int BITS, int GS>
__device__ __forceinline__ void moe_gating_impl(const u32* __restrict__ w, const typename D::T* __restrict__ sc,
                                                const typename D::T* __restrict__ bi, const typename D::T* h,
                                                const typename D::T* __restrict__ nw, typename D::T* __restrict__ xn,
                                                typename D::T* __restrict__ logits_out, u32* __restrict__ ids,
                                                float* __restrict__ wout, u32* ws, int E, int K, int k, int round_probs,
                                                int renorm, u32 qmask, float eps, float inv_n, int cluster) {
  extern __shared__ float xs[];  // xn in f32 (later softmax_topk's scratch, in the ranking block)
  __shared__ float red[32];
  __shared__ bool last;
  // xs holds xn (K floats, with the norm) and is softmax_topk's scratch (E floats); the cluster's
  // logits follow it (host: fused::gating_launch sizes it the same way).
  const int xs_floats = nw != nullptr ? max(K, E) : E;
  typename D::T* logits = cluster ? reinterpret_cast<typename D::T*>(xs + xs_floats) : reinterpret_cast<typename D::T*>(ws + 4);
  // Runs after the first weight loads, in every thread (idle warps walk zero chunks).
  auto norm_prologue = [&]() {
    ZMLX_GRID_DEP();
    const typename D::T* hp = h;
    ZMLX_AFTER_DEP(hp);
    float out[8];
    rms_norm_regs<D>(hp, nw, K, eps, inv_n, red, out);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int i = threadIdx.x + j * blockDim.x;
      if (i < K) {
        xs[i] = D::rnd(out[j]);
        if (blockIdx.x == 0) xn[i] = D::st(out[j]);
      }
    }
    __syncthreads();
  };
  const long long wpr = (long long)K * BITS / 32;
  const int groups = K / GS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + warp;
  const int wrow = row < E ? row : 0;
  const u32* wr[1] = {w + wrow * wpr};
  const typename D::T* sr[1] = {sc + (long long)wrow * groups};
  const typename D::T* br[1] = {bi + (long long)wrow * groups};
  float acc[1];
  if (nw != nullptr) {
    qmv_lane_partials<D, BITS, GS, 1, false>(wr, sr, br, XSharedF32{xs}, row < E ? K >> 5 : 0, lane, qmask, acc, norm_prologue);
  } else {  // h is already normalised: the router rows read it as qmv does
    const typename D::T* xr[1] = {h};
    qmv_lane_partials<D, BITS, GS, 1, false>(wr, sr, br, XGlobal<D>{xr}, row < E ? K >> 5 : 0, lane, qmask, acc, true);
  }
  const float v = warp_sum(acc[0]);
  if (row < E && lane == 0) {
    if (logits_out != nullptr) logits_out[row] = D::st(v);
    else if (cluster) st_rank0(logits + row, D::st(v));
    else {
      logits[row] = D::st(v);
      __threadfence();  // the writer's own fence: visible before the counter moves
    }
  }
  if (logits_out != nullptr) return;  // norm_router: the top-k is a separate launch
  if (cluster) {
    cluster_sync();
    if (blockIdx.x != 0 || warp != 0) return;
  } else {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const u32 done = atomicAdd(ws, 1u);
      last = (done == gridDim.x - 1);
    }
    __syncthreads();
    if (!last || warp != 0) return;
    __threadfence();
    if (lane == 0) ws[0] = 0u;  // ready for the next call / graph replay
  }
  // softmax_topk's own code (one warp, lane = threadIdx.x); it offsets its pointers by
  // blockIdx.x rows, which the pointers passed here undo.
  const long long o = blockIdx.x;
  if (E <= 32 * STK_PER && k <= 32) softmax_topk_fast_impl<D>(logits - o * E, ids - o * k, wout - o * k, E, k, round_probs, renorm);
  else softmax_topk_impl<D>(logits - o * E, ids - o * k, wout - o * k, E, k, round_probs, renorm);
}

// 5. qmv_multi: up to three quantized matrices with the same K (q, k, v projections) in
// one launch; warp `gw` of the grid owns row gw of the concatenation [N0 | N1 | N2] and
// computes it with qmv's per-row code (qmv_lane_partials, warp_sum, one rounding), so each
// output is bitwise qmv's (whose per-row value does not depend on its rows per warp). Each
// matrix has its own bits and group size (a warp-uniform switch). Each warp issues its first
// weight loads before waiting for the previous kernel (the weights are constant).
template <class D, int BITS, int GS>
__device__ __forceinline__ void qmulti_row(const u32* __restrict__ w, const typename D::T* __restrict__ sc,
                                           const typename D::T* __restrict__ bi, const typename D::T* x,
                                           typename D::T* __restrict__ y, int row, int K, u32 qmask, int lane) {
  const long long wpr = (long long)K * BITS / 32;
  const int groups = K / GS;
  const u32* wr[1] = {w + row * wpr};
  const typename D::T* sr[1] = {sc + (long long)row * groups};
  const typename D::T* br[1] = {bi + (long long)row * groups};
  const typename D::T* xr[1] = {x};
  float acc[1];
  qmv_lane_partials<D, BITS, GS, 1, false>(wr, sr, br, XGlobal<D>{xr}, K >> 5, lane, qmask, acc, true);
  const float v = warp_sum(acc[0]);
  if (lane == 0) y[row] = D::st(v);
}
template <class D>
__device__ __forceinline__ void qmv_multi_impl(const typename D::T* x, int K,
                                               const u32* w0, const typename D::T* s0, const typename D::T* b0, typename D::T* y0, int n0, int f0,
                                               const u32* w1, const typename D::T* s1, const typename D::T* b1, typename D::T* y1, int n1, int f1,
                                               const u32* w2, const typename D::T* s2, const typename D::T* b2, typename D::T* y2, int n2, int f2) {
  const int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const u32* w;
  const typename D::T* sc;
  const typename D::T* bi;
  typename D::T* y;
  int f;
  if (row < n0) { w = w0; sc = s0; bi = b0; y = y0; f = f0; }
  else if (row < n0 + n1) { row -= n0; w = w1; sc = s1; bi = b1; y = y1; f = f1; }
  else if (row < n0 + n1 + n2) { row -= n0 + n1; w = w2; sc = s2; bi = b2; y = y2; f = f2; }
  else return;
  // f = bits * 1000 + group size
  switch (f) {
#define ZQM(B, G) case B * 1000 + G: qmulti_row<D, B, G>(w, sc, bi, x, y, row, K, (1u << B) - 1u, lane); break;
#define ZQMG(B) ZQM(B, 32) ZQM(B, 64) ZQM(B, 128)
    ZQMG(2) ZQMG(3) ZQMG(4) ZQMG(5) ZQMG(6) ZQMG(8)
#undef ZQMG
#undef ZQM
    default: break;
  }
}

#define ZMLX_FUSED_C(DT, DN, BITS, GS, R)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) fused_combine_##DN##_b##BITS##_g##GS##_r##R(               \
      const u32* w, const DT::T* s, const DT::T* b, u32* ids, float* wts, const DT::T* logits, int E,          \
      int renorm, int k, const DT::T* act, const DT::T* residual, DT::T* out, int N, int K, u32 qmask) {        \
    gqc_impl<DT, BITS, GS, R>(w, s, b, ids, wts, logits, E, renorm, k, act, residual, out, N, K, qmask);       \
  }
#define ZMLX_FUSED_Q(DT, DN, BITS, GS)                                                                         \
  extern "C" __global__ void __launch_bounds__(256) fused_swiglu_##DN##_b##BITS##_g##GS##_r1(                  \
      const u32* wg, const DT::T* sg, const DT::T* bg, const u32* wu, const DT::T* su, const DT::T* bu,          \
      const u32* ids, const DT::T* logits, int E, const DT::T* x, DT::T* act, int N, int K, u32 qmask) {        \
    ZMLX_GRID_DEP();                                                                                           \
    gqs_impl<DT, BITS, GS, 1>(wg, sg, bg, wu, su, bu, ids, logits, E, x, act, N, K, qmask);                    \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) fused_swiglu_##DN##_b##BITS##_g##GS##_r2(                  \
      const u32* wg, const DT::T* sg, const DT::T* bg, const u32* wu, const DT::T* su, const DT::T* bu,          \
      const u32* ids, const DT::T* logits, int E, const DT::T* x, DT::T* act, int N, int K, u32 qmask) {        \
    ZMLX_GRID_DEP();                                                                                           \
    gqs_impl<DT, BITS, GS, 2>(wg, sg, bg, wu, su, bu, ids, logits, E, x, act, N, K, qmask);                    \
  }                                                                                                            \
  ZMLX_FUSED_C(DT, DN, BITS, GS, 1) ZMLX_FUSED_C(DT, DN, BITS, GS, 2) ZMLX_FUSED_C(DT, DN, BITS, GS, 4)          \
  extern "C" __global__ void __launch_bounds__(512) fused_gating_##DN##_b##BITS##_g##GS(                       \
      const u32* w, const DT::T* s, const DT::T* b, const DT::T* h, const DT::T* nw, DT::T* xn,                \
      DT::T* logits_out, u32* ids, float* wout, u32* ws, int E, int K, int k, int round_probs, int renorm,     \
      u32 qmask, float eps, float inv_n, int cluster) {                                                        \
    moe_gating_impl<DT, BITS, GS>(w, s, b, h, nw, xn, logits_out, ids, wout, ws, E, K, k, round_probs, renorm, \
                                  qmask, eps, inv_n, cluster);                                                 \
  }
#define ZMLX_FUSED_G(DT, DN, BITS) ZMLX_FUSED_Q(DT, DN, BITS, 32) ZMLX_FUSED_Q(DT, DN, BITS, 64) ZMLX_FUSED_Q(DT, DN, BITS, 128)
#define ZMLX_FUSED_ALL(DT, DN)                                                                                 \
  ZMLX_FUSED_G(DT, DN, 2) ZMLX_FUSED_G(DT, DN, 3) ZMLX_FUSED_G(DT, DN, 4) ZMLX_FUSED_G(DT, DN, 5)             \
  ZMLX_FUSED_G(DT, DN, 6) ZMLX_FUSED_G(DT, DN, 8)                                                              \
  extern "C" __global__ void __launch_bounds__(128) fused_qmv_multi_##DN(                                      \
      const DT::T* x, int K, const u32* w0, const DT::T* s0, const DT::T* b0, DT::T* y0, int n0, int f0,        \
      const u32* w1, const DT::T* s1, const DT::T* b1, DT::T* y1, int n1, int f1, const u32* w2,               \
      const DT::T* s2, const DT::T* b2, DT::T* y2, int n2, int f2) {                                           \
    qmv_multi_impl<DT>(x, K, w0, s0, b0, y0, n0, f0, w1, s1, b1, y1, n1, f1, w2, s2, b2, y2, n2, f2);           \
  }                                                                                                            \
  extern "C" __global__ void fused_add_rms_norm_##DN(const DT::T* x, const DT::T* delta, const DT::T* w,       \
                                                     DT::T* h, DT::T* y, int n, float eps, float inv_n) { ZMLX_GRID_DEP();      \
    add_rms_norm_impl<DT>(x, delta, w, h, y, n, eps, inv_n);                                                   \
  }

// ---- The same kernels on the tc4 path (4-bit, bf16/f16, sm_80+): rows computed by
// tc4_block / tc4_row exactly as qmv_tc computes them, so the rule above still holds. ----

// gather_qmm_swiglu: block = one 16-row tile of gate and up of slot blockIdx.y (item 0 gate,
// 1 up); act = swiglu(r(gate row), r(up row)).
template <class D, int GS>
__device__ __forceinline__ void gqs_tc_impl(const u32* __restrict__ wg, const typename D::T* __restrict__ sg,
                                            const typename D::T* __restrict__ bg, const u32* __restrict__ wu,
                                            const typename D::T* __restrict__ su, const typename D::T* __restrict__ bu,
                                            const u32* ids, const typename D::T* logits, int E, const typename D::T* x,
                                            typename D::T* __restrict__ act, int N, int K) {
  __shared__ float part[2 * TC_MAX_SLICES * 16];
  const int slot = blockIdx.y, chunks = K >> 5, row0 = blockIdx.x * 16;
  const long long off = slot_expert<D>(ids, logits, E) * N;  // rows of the slot's expert
  auto rows = [&](int i) {
    return i == 0 ? tc_rows<D, GS>(wg + off * (K / 8), sg + off * (K / GS), bg + off * (K / GS), x, N, K, row0)
                  : tc_rows<D, GS>(wu + off * (K / 8), su + off * (K / GS), bu + off * (K / GS), x, N, K, row0);
  };
  tc4_block<D, GS>(2, chunks, rows, false, part);
  __syncthreads();
  const int r = threadIdx.x, slices = (chunks + TC_SLICE - 1) / TC_SLICE;
  if (r < 16 && row0 + r < N) {
    const float g = D::rnd(tc4_row(part, 0, slices, r));
    const float u = D::rnd(tc4_row(part, 1, slices, r));
    act[(long long)slot * N + row0 + r] = swiglu_val<D>(g, u);
  }
}

// Row r of a combine tile from the tc4 partials of its k slots: m = sum_f32 r(w_j * r(y_j)) in
// slot order, as moe_combine (the caller adds the residual: r(residual + r(m)), or r(m)).
template <class D>
__device__ __forceinline__ float combine_tc_sum(const float* wts, const float* part, int k, int slices, int r) {
  float m = 0.0f;
  for (int j = 0; j < k; j++) m = __fadd_rn(m, D::rnd(__fmul_rn(wts[j], D::rnd(tc4_row(part, j, slices, r)))));
  return m;
}

// gather_qmm_combine: block = one 16-row tile of the output; item j = slot j's expert rows
// with x = act_j. ids are read and weights requested before the dependency wait (ids come
// from two kernels back, as in gqc_impl); act, wts and residual after it.
template <class D, int GS>
__device__ __forceinline__ void gqc_tc_impl(const u32* __restrict__ w, const typename D::T* __restrict__ s,
                                            const typename D::T* __restrict__ b, u32* ids, float* wts,
                                            const typename D::T* logits, int E, int renorm, int k, const typename D::T* act,
                                            const typename D::T* residual, typename D::T* out, int N, int K) {
  extern __shared__ float part[];  // [k][slices][16]
  __shared__ u32 ids_sh[32];
  __shared__ float w_sh[32];
  combine_route<D>(ids, wts, logits, E, k, renorm, ids_sh, w_sh);
  const int chunks = K >> 5, row0 = blockIdx.x * 16;
  auto rows = [&](int j) {
    const long long off = (long long)ids[j] * N;
    return tc_rows<D, GS>(w + off * (K / 8), s + off * (K / GS), b + off * (K / GS), act + (long long)j * K, N, K, row0);
  };
  tc4_block<D, GS>(k, chunks, rows, true, part);
  ZMLX_GRID_DEP();  // (again) for warps without a slice: wts and residual come next
  ZMLX_AFTER_DEP(wts);
  ZMLX_AFTER_DEP(residual);
  __syncthreads();
  const int r = threadIdx.x, slices = (chunks + TC_SLICE - 1) / TC_SLICE;
  if (r < 16 && row0 + r < N) {
    const float m = combine_tc_sum<D>(wts, part, k, slices, r);
    out[row0 + r] = residual != 0 ? D::st(__fadd_rn(D::ld(residual[row0 + r]), D::rnd(m))) : D::st(m);
  }
}

// moe_experts' shared-memory row stride for down words (host: fused::moe_experts_smem): rows
// 16 words apart modulo 32, so the 8 lanes of a 16-byte load phase (rows g, g + 1; chunks
// t = 0..3) hit 32 different banks.
__device__ __forceinline__ int moe_experts_row_words(int NI) {
  const int wpr = NI / 8;
  return wpr + ((16 - wpr % 32) + 32) % 32;
}

// 6. moe_experts: gather_qmm_swiglu + gather_qmm_combine in ONE persistent launch, for 4-bit
// experts whose down projection is on the tc4 path (gate/up on qmv's FFMA path). Every block is
// resident at once (the host sizes the grid with the occupancy API), so:
//  - right after the dependency wait (ids and x come from earlier kernels), each block copies the
//    down weights of its first 16-row output tile (all k experts) into shared memory with
//    cp.async; they arrive while phase 1 runs, instead of after the gate/up kernel has drained;
//  - phase 1: the grid's warps walk the (slot, R-row) units of gate/up with gqs_rows (so act is
//    bitwise gather_qmm_swiglu's), act to global memory;
//  - grid_barrier; act (all k slots) into shared memory with L2 loads;
//  - phase 2: gqc_tc_impl's arithmetic on the staged tile (tc4_slice_shared, tc4_row, the
//    weighted sum in slot order, the residual), so out is bitwise gather_qmm_combine's.
// Down: N = hidden (a multiple of 16), K = NI (the gate/up rows). Dynamic shared memory
// (host: fused::moe_experts_smem): words [k][16][NI/8] u32 | scales, biases [k][16][NI/GS] |
// act [k][NI] | partials [k][slices][16] f32. bar: grid_barrier's arrival counter.
template <class D, int GS, int R>
__device__ __forceinline__ void moe_experts_impl(const u32* __restrict__ wg, const typename D::T* __restrict__ sg,
                                                 const typename D::T* __restrict__ bg, const u32* __restrict__ wu,
                                                 const typename D::T* __restrict__ su, const typename D::T* __restrict__ bu,
                                                 const u32* __restrict__ wd, const typename D::T* __restrict__ sd,
                                                 const typename D::T* __restrict__ bd, const u32* ids, const float* wts,
                                                 int k, const typename D::T* x, typename D::T* act,
                                                 const typename D::T* residual, typename D::T* out, int N, int NI,
                                                 u32 qmask, u64* bar, int stop_after) {
  typedef typename D::T T;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_wts[64];
  const int wpr = NI / 8, gpr = NI / GS;  // down: words and groups per row
  const int wstride = moe_experts_row_words(NI);  // padded: rows g and g + 1 in other banks
  u32* s_w = reinterpret_cast<u32*>(smem);
  T* s_s = reinterpret_cast<T*>(s_w + k * 16 * wstride);
  T* s_b = s_s + k * 16 * gpr;
  T* s_act = s_b + k * 16 * gpr;
  float* part = reinterpret_cast<float*>(s_act + k * NI);
  const int tiles = N / 16, G = gridDim.x;
  const int chunks = NI >> 5, slices = (chunks + TC_SLICE - 1) / TC_SLICE;
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  ZMLX_GRID_DEP();
  // The k experts' rows tile*16 .. +15 of down, in 16-byte units: words row by row (padded
  // rows in shared memory), scales and biases as one contiguous run per expert.
  auto stage = [&](int tile) {
    const int wrow16 = wpr / 4, su16 = 16 * gpr * (int)sizeof(T) / 16, per = 16 * wrow16 + 2 * su16;
    for (int i = threadIdx.x; i < k * per; i += blockDim.x) {
      const int j = i / per, o = i % per;
      const long long row = (long long)ids[j] * N + tile * 16;
      if (o < 16 * wrow16) {
        const int rr = o / wrow16, c = o % wrow16;
        cp_async16(s_w + (j * 16 + rr) * wstride + 4 * c, wd + (row + rr) * wpr + 4 * c);
      } else if (o < 16 * wrow16 + su16) {
        const int u = o - 16 * wrow16;
        cp_async16(reinterpret_cast<uint4*>(s_s + j * 16 * gpr) + u, reinterpret_cast<const uint4*>(sd + row * gpr) + u);
      } else {
        const int u = o - 16 * wrow16 - su16;
        cp_async16(reinterpret_cast<uint4*>(s_b + j * 16 * gpr) + u, reinterpret_cast<const uint4*>(bd + row * gpr) + u);
      }
    }
  };
  int tile = blockIdx.x;
  if (tile < tiles && stop_after != 5) stage(tile);
  // What phase 2 reads from earlier kernels, fetched now rather than after the barrier.
  if (threadIdx.x < k) s_wts[threadIdx.x] = wts[threadIdx.x];
  float res = 0.0f;
  if (threadIdx.x < 16 && tile < tiles && residual != 0) res = D::ld(residual[tile * 16 + threadIdx.x]);
  // Phase 1.
  const int units = (NI + R - 1) / R;
  for (int u = blockIdx.x * nw + warp; u < k * units; u += G * nw) {
    const int slot = u / units;
    gqs_rows<D, 4, GS, R>(wg, sg, bg, wu, su, bu, ids[slot], slot, (u % units) * R, x, act, NI, N, qmask);
  }
  if (stop_after == 1 || stop_after == 5) return;  // measurements only (fused::moe_experts_partial)
  grid_barrier(bar);
  if (tile >= tiles || stop_after == 2) return;
  for (int i = threadIdx.x; i < k * NI / 8; i += blockDim.x)
    reinterpret_cast<uint4*>(s_act)[i] = ld_cg16(reinterpret_cast<const uint4*>(act) + i);
  // Phase 2, tile by tile (more than one only when the grid is smaller than N / 16).
  for (;;) {
    cp_async_wait_all();
    __syncthreads();
    if (stop_after == 3) return;
    // Item j: slot j's 16 staged rows (lane (g, t) feeds rows g and g + 8) with x = act_j.
    auto rows = [&](int j) {
      const int g = (threadIdx.x & 31) >> 2;
      TcRows<D> rr;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        rr.w[h] = s_w + (j * 16 + g + 8 * h) * wstride;
        rr.s[h] = s_s + (j * 16 + g + 8 * h) * gpr;
        rr.b[h] = s_b + (j * 16 + g + 8 * h) * gpr;
      }
      rr.x = s_act + j * NI;
      return rr;
    };
    tc4_block<D, GS, true>(k, chunks, rows, false, part);
    __syncthreads();
    if (stop_after == 4) return;
    const int r = threadIdx.x;
    if (r < 16) {
      const float m = combine_tc_sum<D>(s_wts, part, k, slices, r);
      out[tile * 16 + r] = residual != 0 ? D::st(__fadd_rn(res, D::rnd(m))) : D::st(m);
    }
    tile += G;
    if (tile >= tiles) break;
    __syncthreads();  // the staged tile and the partials are free again
    stage(tile);
    if (threadIdx.x < 16 && residual != 0) res = D::ld(residual[tile * 16 + threadIdx.x]);
  }
}

// qmv_multi: block = one 16-row tile of one of the (up to three) matrices, all 4-bit; the
// tiles of matrix 0 first. f = group size of each matrix.
template <class D, int GS>
__device__ __forceinline__ void qmulti_tc_tile(const u32* w, const typename D::T* sc, const typename D::T* bi,
                                               const typename D::T* x, typename D::T* y, int N, int K, int row0, float* part) {
  const int chunks = K >> 5;
  tc4_block<D, GS>(1, chunks, [&](int) { return tc_rows<D, GS>(w, sc, bi, x, N, K, row0); }, true, part);
  ZMLX_GRID_DEP();
  __syncthreads();
  const int r = threadIdx.x;
  if (r < 16 && row0 + r < N) y[row0 + r] = D::st(tc4_row(part, 0, (chunks + TC_SLICE - 1) / TC_SLICE, r));
}
template <class D>
__device__ __forceinline__ void qmv_multi_tc_impl(const typename D::T* x, int K,
                                                  const u32* w0, const typename D::T* s0, const typename D::T* b0, typename D::T* y0, int n0, int f0,
                                                  const u32* w1, const typename D::T* s1, const typename D::T* b1, typename D::T* y1, int n1, int f1,
                                                  const u32* w2, const typename D::T* s2, const typename D::T* b2, typename D::T* y2, int n2, int f2) {
  __shared__ float part[TC_MAX_SLICES * 16];
  int tile = blockIdx.x;
  const int t0 = (n0 + 15) / 16, t1 = (n1 + 15) / 16;
  const u32* w = w0;
  const typename D::T* sc = s0;
  const typename D::T* bi = b0;
  typename D::T* y = y0;
  int n = n0, f = f0;
  if (tile >= t0 + t1) { tile -= t0 + t1; w = w2; sc = s2; bi = b2; y = y2; n = n2; f = f2; }
  else if (tile >= t0) { tile -= t0; w = w1; sc = s1; bi = b1; y = y1; n = n1; f = f1; }
  switch (f) {  // block-uniform
    case 32: qmulti_tc_tile<D, 32>(w, sc, bi, x, y, n, K, tile * 16, part); break;
    case 64: qmulti_tc_tile<D, 64>(w, sc, bi, x, y, n, K, tile * 16, part); break;
    case 128: qmulti_tc_tile<D, 128>(w, sc, bi, x, y, n, K, tile * 16, part); break;
    default: break;
  }
}

// Launch bounds: R = 1 (82 registers) fits 768 threads = 24 warps per SM; R = 2 (128) 512.
#define ZMLX_MOE_EXPERTS(DT, DN, GS, R)                                                                        \
  extern "C" __global__ void __launch_bounds__(R == 1 ? 768 : 512) fused_moe_experts_##DN##_g##GS##_r##R(      \
      const u32* wg, const DT::T* sg, const DT::T* bg, const u32* wu, const DT::T* su, const DT::T* bu,          \
      const u32* wd, const DT::T* sd, const DT::T* bd, const u32* ids, const float* wts, int k, const DT::T* x,  \
      DT::T* act, const DT::T* residual, DT::T* out, int N, int NI, u32 qmask, u64* bar, int stop_after) {     \
    moe_experts_impl<DT, GS, R>(wg, sg, bg, wu, su, bu, wd, sd, bd, ids, wts, k, x, act, residual, out, N, NI,  \
                                qmask, bar, stop_after);                                                       \
  }
#define ZMLX_FUSED_TC1(DT, DN, GS)                                                                             \
  extern "C" __global__ void __launch_bounds__(32 * TC_MAX_WARPS) fused_swiglu_tc_##DN##_g##GS(                \
      const u32* wg, const DT::T* sg, const DT::T* bg, const u32* wu, const DT::T* su, const DT::T* bu,          \
      const u32* ids, const DT::T* logits, int E, const DT::T* x, DT::T* act, int N, int K) {                  \
    ZMLX_GRID_DEP();                                                                                           \
    gqs_tc_impl<DT, GS>(wg, sg, bg, wu, su, bu, ids, logits, E, x, act, N, K);                                 \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * TC_MAX_WARPS) fused_combine_tc_##DN##_g##GS(               \
      const u32* w, const DT::T* s, const DT::T* b, u32* ids, float* wts, const DT::T* logits, int E,          \
      int renorm, int k, const DT::T* act, const DT::T* residual, DT::T* out, int N, int K) {                  \
    gqc_tc_impl<DT, GS>(w, s, b, ids, wts, logits, E, renorm, k, act, residual, out, N, K);                    \
  }                                                                                                            \
  ZMLX_MOE_EXPERTS(DT, DN, GS, 1) ZMLX_MOE_EXPERTS(DT, DN, GS, 2)
#define ZMLX_FUSED_TC(DT, DN)                                                                                  \
  ZMLX_FUSED_TC1(DT, DN, 32) ZMLX_FUSED_TC1(DT, DN, 64) ZMLX_FUSED_TC1(DT, DN, 128)                          \
  extern "C" __global__ void __launch_bounds__(32 * TC_MAX_WARPS) fused_qmv_multi_tc_##DN(                     \
      const DT::T* x, int K, const u32* w0, const DT::T* s0, const DT::T* b0, DT::T* y0, int n0, int f0,        \
      const u32* w1, const DT::T* s1, const DT::T* b1, DT::T* y1, int n1, int f1, const u32* w2,               \
      const DT::T* s2, const DT::T* b2, DT::T* y2, int n2, int f2) {                                           \
    qmv_multi_tc_impl<DT>(x, K, w0, s0, b0, y0, n0, f0, w1, s1, b1, y1, n1, f1, w2, s2, b2, y2, n2, f2);        \
  }
