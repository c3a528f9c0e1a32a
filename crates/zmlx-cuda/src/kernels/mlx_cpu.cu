// MLX's CPU numerics on the GPU (`--numerics mlx-cpu`): each kernel rounds and accumulates
// exactly as MLX's CPU backend does (zmlx-core transcribes it: quant::matmul_t, ops::rms_norm,
// ops::sdpa, ops::softmax_precise + argpartition, ops::logsumexp): serial sums in element
// order from 0, every op of a bf16/f16 model rounded to the dtype, no fused multiply-add.
// A model run with these kernels gives the CPU reference's logits bit for bit, so the CUDA
// model (weights, caches, graph, positions) is checked against mlx-lm's arithmetic without
// the GPU's faster f32 accumulation in the way. Slow by design: one thread per output.

// sum = r(sum + r(a * b)): MLX's `T sum; sum += a * b` for T = bf16/f16 (plain f32 for f32).
template <class D> __device__ __forceinline__ float mc_acc(float sum, float a, float b) {
  return D::rnd(__fadd_rn(sum, D::rnd(__fmul_rn(a, b))));
}

// Quantized matmul as MLX's CPU `_qmm_t`: y[slot][row] = Σ_k r(x_k · w_k) accumulated in the
// dtype, w_k = r(r(scale · q_k) + bias). One thread per row; grid.y = slot (expert
// ids[slot] when ids, else 0); x per slot when x_stride > 0.
template <class D>
__device__ __forceinline__ void mc_qmm_impl(const u32* w, const typename D::T* s, const typename D::T* b,
                                            const typename D::T* x, typename D::T* y, const u32* ids, int N,
                                            int K, int bits, int gs, int x_stride) {
  const int slot = blockIdx.y, row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= N) return;
  const long long e = ids ? (long long)ids[slot] : 0;
  const long long r = e * N + row;
  const int wpr = K / 32 * bits, gpr = K / gs;
  const u32* wr = w + r * wpr;
  const typename D::T* sr = s + r * gpr;
  const typename D::T* br = b + r * gpr;
  x += (long long)slot * x_stride;
  const u64 mask = (1ull << bits) - 1;
  u64 acc = 0;
  int nbits = 0, wi = 0;
  float sum = 0.0f;
  for (int g = 0; g < gpr; g++) {
    const float scale = D::ld(sr[g]), bias = D::ld(br[g]);
    for (int i = 0; i < gs; i++) {
      if (nbits < bits) {  // LSB-first bit stream over the row's words (every bit width)
        acc |= (u64)wr[wi++] << nbits;
        nbits += 32;
      }
      const float q = (float)(u32)(acc & mask);
      acc >>= bits;
      nbits -= bits;
      const float wv = D::rnd(__fadd_rn(D::rnd(__fmul_rn(scale, q)), bias));
      sum = mc_acc<D>(sum, D::ld(x[g * gs + i]), wv);
    }
  }
  y[(long long)slot * N + row] = D::st(sum);
}

// RMSNorm as MLX's CPU fallback: Σx² in f32 in order, ρ = 1/sqrt(Σ·(1/n) + eps), y = r(r(x·ρ)·w).
// One block per row; thread 0 sums, every thread then writes its elements (in place allowed).
template <class D>
__device__ __forceinline__ void mc_rms_norm_impl(const typename D::T* x, const typename D::T* w, typename D::T* y,
                                                 int n, float eps, float inv_n) {
  __shared__ float rho;
  x += (long long)blockIdx.x * n;
  y += (long long)blockIdx.x * n;
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
      const float v = D::ld(x[i]);
      sum = __fadd_rn(sum, __fmul_rn(v, v));
    }
    rho = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(sum, inv_n), eps)));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = D::st(__fmul_rn(D::rnd(__fmul_rn(D::ld(x[i]), rho)), D::ld(w[i])));
}

// The serial half of `mx.softmax(precise=True)` over n f32 values, one thread: the max, then
// 1/Σ mlx_exp(v - max) with the sum in f32 in order. p_i = r(mlx_exp(v_i - max) · inv).
__device__ __forceinline__ void mc_softmax_stats(const float* v, int n, float& m, float& inv) {
  m = -ZMLX_INF;
  for (int i = 0; i < n; i++) m = fmaxf(m, v[i]);
  float sum = 0.0f;
  for (int i = 0; i < n; i++) sum = __fadd_rn(sum, mlx_exp(__fsub_rn(v[i], m)));
  inv = __fdiv_rn(1.0f, sum);
}
// `mx.softmax(precise=True)` over n f32 values in place (values of the dtype), one thread.
template <class D> __device__ __forceinline__ void mc_softmax_serial(float* v, int n) {
  float m, inv;
  mc_softmax_stats(v, n, m, inv);
  for (int i = 0; i < n; i++) v[i] = D::rnd(__fmul_rn(mlx_exp(__fsub_rn(v[i], m)), inv));
}

// Decode attention as MLX's CPU sdpa fallback (zmlx-core ops::sdpa, one query): q' = r(r(scale)·q),
// score_j = r(Σ_d q'_d·k_jd) (f32, in order), precise softmax, y_c = r(Σ_j p_j·v_jc) (f32, in
// order). One block per q head; scores in `ws` ([n_heads, max_len] f32).
template <class D>
__device__ __forceinline__ void mc_attention_impl(const typename D::T* q, const typename D::T* kc, const typename D::T* vc,
                                                  typename D::T* y, float* ws, const int* len_ptr, int len_add, int G,
                                                  int max_len, int hd, float scale) {
  __shared__ float qs[256];
  __shared__ float stat[2];
  const int h = blockIdx.x, kvh = h / G, tid = threadIdx.x;
  const int len = *len_ptr + len_add;
  const float scale_r = D::rnd(scale);
  for (int d = tid; d < hd; d += blockDim.x) qs[d] = D::rnd(__fmul_rn(scale_r, D::ld(q[(long long)h * hd + d])));
  __syncthreads();
  const typename D::T* kh = kc + (long long)kvh * max_len * hd;
  const typename D::T* vh = vc + (long long)kvh * max_len * hd;
  float* sc = ws + (long long)h * max_len;
  for (int j = tid; j < len; j += blockDim.x) {
    float acc = 0.0f;
    for (int d = 0; d < hd; d++) acc = __fadd_rn(acc, __fmul_rn(qs[d], D::ld(kh[(long long)j * hd + d])));
    sc[j] = D::rnd(acc);
  }
  __syncthreads();
  if (tid == 0) mc_softmax_stats(sc, len, stat[0], stat[1]);
  __syncthreads();
  for (int j = tid; j < len; j += blockDim.x) sc[j] = D::rnd(__fmul_rn(mlx_exp(__fsub_rn(sc[j], stat[0])), stat[1]));
  __syncthreads();
  for (int c = tid; c < hd; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < len; j++) acc = __fadd_rn(acc, __fmul_rn(sc[j], D::ld(vh[(long long)j * hd + c])));
    y[(long long)h * hd + c] = D::st(acc);
  }
}

// ---- libstdc++'s std::nth_element (introselect), as zmlx-core ops::argpartition transcribes it.
// MLX's CPU argpartition compares v[a] < v[b] || (v[a] == v[b] && a < b), NaN last; the order of
// the selected indices is the algorithm's, and mlx-lm sums the experts in that order.
struct McLess {
  const float* v;
  __device__ bool operator()(u32 a, u32 b) const {
    const float va = v[a], vb = v[b];
    if (va != va) return false;
    if (vb != vb) return true;
    return va < vb || (va == vb && a < b);
  }
};
__device__ __forceinline__ void mc_swap(u32* v, int a, int b) {
  const u32 t = v[a];
  v[a] = v[b];
  v[b] = t;
}
__device__ void mc_adjust_heap(u32* v, int first, int hole, int len, u32 value, const McLess& less) {
  const int top = hole;
  int child = hole;
  while (child < (len - 1) / 2) {
    child = 2 * (child + 1);
    if (less(v[first + child], v[first + child - 1])) child--;
    v[first + hole] = v[first + child];
    hole = child;
  }
  if ((len & 1) == 0 && child == (len - 2) / 2) {
    child = 2 * (child + 1);
    v[first + hole] = v[first + child - 1];
    hole = child - 1;
  }
  int parent = hole > 0 ? (hole - 1) / 2 : 0;
  while (hole > top && less(v[first + parent], value)) {
    v[first + hole] = v[first + parent];
    hole = parent;
    parent = hole > 0 ? (hole - 1) / 2 : 0;
  }
  v[first + hole] = value;
}
__device__ void mc_heap_select(u32* v, int first, int middle, int last, const McLess& less) {
  const int len = middle - first;
  if (len >= 2) {
    for (int parent = (len - 2) / 2;; parent--) {
      mc_adjust_heap(v, first, parent, len, v[first + parent], less);
      if (parent == 0) break;
    }
  }
  for (int i = middle; i < last; i++) {
    if (less(v[i], v[first])) {  // pop_heap(first, middle, i)
      const u32 value = v[i];
      v[i] = v[first];
      mc_adjust_heap(v, first, 0, len, value, less);
    }
  }
}
__device__ void mc_move_median_to_first(u32* v, int result, int a, int b, int c, const McLess& less) {
  int pick;
  if (less(v[a], v[b])) pick = less(v[b], v[c]) ? b : (less(v[a], v[c]) ? c : a);
  else pick = less(v[a], v[c]) ? a : (less(v[b], v[c]) ? c : b);
  mc_swap(v, result, pick);
}
__device__ int mc_unguarded_partition(u32* v, int first, int last, int pivot, const McLess& less) {
  for (;;) {
    while (less(v[first], v[pivot])) first++;
    last--;
    while (less(v[pivot], v[last])) last--;
    if (first >= last) return first;
    mc_swap(v, first, last);
    first++;
  }
}
__device__ void mc_insertion_sort(u32* v, int first, int last, const McLess& less) {
  if (first == last) return;
  for (int i = first + 1; i < last; i++) {
    const u32 val = v[i];
    if (less(val, v[first])) {
      for (int j = i; j > first; j--) v[j] = v[j - 1];
      v[first] = val;
    } else {
      int j = i;
      while (less(val, v[j - 1])) {
        v[j] = v[j - 1];
        j--;
      }
      v[j] = val;
    }
  }
}
__device__ void mc_argpartition(u32* idx, int n, int nth, const McLess& less) {
  for (int i = 0; i < n; i++) idx[i] = i;
  if (n == 0 || nth >= n) return;
  int first = 0, last = n;
  int depth = 2 * (31 - __clz(n));
  while (last - first > 3) {
    if (depth == 0) {
      mc_heap_select(idx, first, nth + 1, last, less);
      mc_swap(idx, first, nth);
      return;
    }
    depth--;
    const int mid = first + (last - first) / 2;
    mc_move_median_to_first(idx, first, first + 1, mid, last - 1, less);
    const int cut = mc_unguarded_partition(idx, first + 1, last, first, less);
    if (cut <= nth) first = cut;
    else last = cut;
  }
  mc_insertion_sort(idx, first, last, less);
}

// mlx-lm's Qwen3-MoE router tail on the CPU: p = softmax(logits, precise) (dtype), the top k by
// argpartition(p, E - k)[E - k:], weights p (or r(p / r(Σ_f32 p)) with renorm, the sum in list
// order). One thread; E ≤ MC_TOPK_MAX_E. Weights are written as f32 (values of the dtype).
#define MC_TOPK_MAX_E 2048
template <class D>
__device__ __forceinline__ void mc_softmax_topk_impl(const typename D::T* logits, u32* ids, float* w, int E, int k,
                                                     int renorm) {
  __shared__ float p[MC_TOPK_MAX_E];
  __shared__ u32 idx[MC_TOPK_MAX_E];
  if (threadIdx.x != 0) return;
  for (int i = 0; i < E; i++) p[i] = D::ld(logits[i]);
  mc_softmax_serial<D>(p, E);
  mc_argpartition(idx, E, E - k, McLess{p});
  float sum = 0.0f;
  for (int j = 0; j < k; j++) sum = __fadd_rn(sum, p[idx[E - k + j]]);
  sum = D::rnd(sum);
  for (int j = 0; j < k; j++) {
    const u32 e = idx[E - k + j];
    ids[j] = e;
    w[j] = renorm ? D::rnd(__fdiv_rn(p[e], sum)) : p[e];
  }
}

// mlx-lm's greedy token on the CPU: argmax(r(l - lse)), lse = r(ln(Σ_f32 mlx_exp(l - max)) + max)
// (r(max) when max is ±inf), the sum in order; first index of the maximum. One thread. ln is
// the correctly rounded f32 log (via double); glibc's logf, which the CPU uses, is within
// 0.82 ulp of it, so the two may differ in the last f32 bit (not seen on any fixture).
template <class D> __device__ __forceinline__ void mc_logprobs_argmax_impl(const typename D::T* l, u32* out, int n) {
  if (threadIdx.x != 0) return;
  float m = -ZMLX_INF;
  for (int i = 0; i < n; i++) m = fmaxf(m, D::ld(l[i]));
  float lse;
  if (fabsf(m) == ZMLX_INF) {
    lse = D::rnd(m);
  } else {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum = __fadd_rn(sum, mlx_exp(__fsub_rn(D::ld(l[i]), m)));
    lse = D::rnd(__fadd_rn((float)log((double)sum), m));
  }
  u32 best = 0;
  float bv = D::rnd(__fsub_rn(D::ld(l[0]), lse));
  for (int i = 1; i < n; i++) {
    const float v = D::rnd(__fsub_rn(D::ld(l[i]), lse));
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  *out = best;
}

#define ZMLX_MLX_CPU(DT, DN)                                                                                   \
  extern "C" __global__ void mlxcpu_qmm_##DN(const u32* w, const DT::T* s, const DT::T* b, const DT::T* x,     \
                                             DT::T* y, const u32* ids, int N, int K, int bits, int gs,         \
                                             int x_stride) { ZMLX_GRID_DEP();                                  \
    mc_qmm_impl<DT>(w, s, b, x, y, ids, N, K, bits, gs, x_stride);                                             \
  }                                                                                                            \
  extern "C" __global__ void mlxcpu_rms_norm_##DN(const DT::T* x, const DT::T* w, DT::T* y, int n, float eps,  \
                                                  float inv_n) { ZMLX_GRID_DEP();                              \
    mc_rms_norm_impl<DT>(x, w, y, n, eps, inv_n);                                                              \
  }                                                                                                            \
  extern "C" __global__ void mlxcpu_attention_##DN(const DT::T* q, const DT::T* kc, const DT::T* vc, DT::T* y, \
                                                   float* ws, const int* len, int len_add, int G, int max_len, \
                                                   int hd, float scale) { ZMLX_GRID_DEP();                     \
    mc_attention_impl<DT>(q, kc, vc, y, ws, len, len_add, G, max_len, hd, scale);                              \
  }                                                                                                            \
  extern "C" __global__ void mlxcpu_softmax_topk_##DN(const DT::T* logits, u32* ids, float* w, int E, int k,   \
                                                      int renorm) { ZMLX_GRID_DEP();                           \
    mc_softmax_topk_impl<DT>(logits, ids, w, E, k, renorm);                                                    \
  }                                                                                                            \
  extern "C" __global__ void mlxcpu_logprobs_argmax_##DN(const DT::T* l, u32* out, int n) { ZMLX_GRID_DEP();   \
    mc_logprobs_argmax_impl<DT>(l, out, n);                                                                    \
  }
