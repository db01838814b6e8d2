// Expert-choice routing: device helpers shared by the score, select and route kernels.
//
// Exactness: the ids must equal the reference bit for bit, so every selection score is
// computed with the same float operations, in the same order, as PyTorch's CUDA kernels
// that the reference runs (torch.softmax -> the persistent warp softmax for E <= 1024,
// torch.sigmoid -> 1 / (1 + expf(-x))). Build WITHOUT --use_fast_math / -ftz.
//
// Row layout (the layout of PyTorch's softmax_warp_forward): a row is handled by a segment
// of WS = min(next_pow2(E), 32) lanes; lane `sub` holds experts it * WS + sub for
// it < ITER = next_pow2(E) / WS. A warp holds 32 / WS rows at once.
#pragma once

#include <cfloat>
#include <cstdint>
#include <utility>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ec_params.h"

namespace ec {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Monotone map float -> uint32 (larger float, larger key); -0.0 is folded onto +0.0 so
// that equal floats give equal keys. Never called on NaN.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Composite pick key: score key in the high word, ~t in the low word, so that a larger
// composite means "better score, then lower token index" and all composites are distinct.
__device__ __forceinline__ unsigned long long pick_composite(uint32_t key, int t) {
  return (static_cast<unsigned long long>(key) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(t));
}

// T' clamped to [0, T].
__device__ __forceinline__ long long num_valid_rows(const Params& p) {
  long long tv = p.ntnp_host;
  if (p.ntnp != nullptr) {
    tv = p.ntnp_is64 ? *reinterpret_cast<const long long*>(p.ntnp)
                     : static_cast<long long>(*reinterpret_cast<const int*>(p.ntnp));
  }
  return tv < 0 ? 0 : (tv > p.T ? static_cast<long long>(p.T) : tv);
}

// C = min(T', ceil(T' * (cf * k / E) - 1e-9)) in double, without FMA contraction (as the
// reference's separate torch ops round it); C = T' when T' < min_tokens (hybrid mode).
__device__ __forceinline__ long long capacity_of(const Params& p, long long tv) {
  const double tvd = static_cast<double>(tv);
  const double c = ceil(__dsub_rn(__dmul_rn(tvd, p.cap_factor), 1e-9));
  const double m = c < tvd ? c : tvd;
  if (tv < p.min_tokens) return tv;
  return static_cast<long long>(m);
}

// Max over the WS lanes of a segment.
template <int WS>
__device__ __forceinline__ uint32_t segment_max(uint32_t v) {
  if constexpr (WS == 32) {
    return __reduce_max_sync(kFull, v);
  } else {
#pragma unroll
    for (int off = WS / 2; off > 0; off >>= 1) {
      const uint32_t o = __shfl_xor_sync(kFull, v, off, WS);
      v = v > o ? v : o;
    }
    return v;
  }
}

// Per-segment scratch for grouped top-k (shared memory), sized P entries each.
struct GroupScratch {
  float* sel;
  uint32_t* gkey;
  unsigned char* gsel;
};

// Row statistics that let one element's scores be recomputed alone (ec_stream.cu
// elem_pick_key): the softmax max and sum, and the bit mask of the kept groups (<= 32 groups).
struct RowStat {
  float m;
  float sum;
  uint32_t gmask;
};

// s[it] = s[it] / sum (IEEE division) for a softmax row: s[it] = exp(v - max) in [0, 1] (or
// NaN) and sum >= 1 (the max's own term is 1) or NaN. nvcc expands each `/` into MUFU.RCP, one
// Newton step for the reciprocal r, q0 = x * r, rem = fma(-sum, q0, x), q = fma(r, rem, q0),
// and an FCHK test that sends operands whose intermediates could under- or overflow to a slow
// path. Here the reciprocal and its Newton step are computed once per lane (the same three
// operations, so the same r) and each element costs the last three; the lane takes the plain
// `/` unless sum >= 1 and every x >= 2^-60 (with x <= 1 and sum <= 512 no intermediate can
// leave the normal range there, so FCHK passes and the compiler's own expansion computes
// exactly these operations: the same bits). NaN fails both tests. The three operations give
// the correctly rounded quotient for any r within 2 ulp of 1 / sum there (CPU check with exact
// rounding: benchmark/check_softmax_divide.py).
template <int ITER>
__device__ __forceinline__ void softmax_divide(float (&s)[ITER], float sum) {
  bool fast = sum >= 1.0f;
#pragma unroll
  for (int it = 0; it < ITER; ++it) fast = fast && s[it] >= 0x1p-60f;
  if (fast) {
    float r0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(sum));
    const float r = __fmaf_rn(r0, __fmaf_rn(-sum, r0, 1.0f), r0);
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const float q0 = __fmul_rn(s[it], r);
      s[it] = __fmaf_rn(r, __fmaf_rn(-sum, q0, s[it]), q0);
    }
  } else {
#pragma unroll
    for (int it = 0; it < ITER; ++it) s[it] = s[it] / sum;
  }
}

// Scores of one row (token t) in the segment layout.
//   s     : weight score (softmax / sigmoid), fp32
//   rkey  : row-order key of nan_to_num(select, nan=-inf) (0 for padding lanes e >= E)
//   pkey  : pick key: order_key(select) if the token is valid and select > -inf, else 0
// All lanes of the warp must call this together (shuffles and __syncwarp inside).
// `rs` (optional) receives the row's softmax max and sum and kept-group mask.
template <int WS, int ITER, typename scalar_t>
__device__ __forceinline__ void row_scores(const Params& p, int t, int sub, bool row_in,
                                           bool tok_valid, const GroupScratch& scr,
                                           float (&s)[ITER], uint32_t (&rkey)[ITER],
                                           uint32_t (&pkey)[ITER], RowStat* rs = nullptr) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(p.logits);
  float v[ITER];
  if (p.stride_e == 1) {  // contiguous rows (the usual case): one row address, constant offsets
    const scalar_t* xr = x + static_cast<long long>(row_in ? t : 0) * p.stride_t + sub;
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      v[it] = (row_in && it * WS + sub < p.E) ? load_f(xr + it * WS) : -INFINITY;
    }
  } else {
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const int e = it * WS + sub;
      v[it] = -INFINITY;
      if (row_in && e < p.E) {
        v[it] = load_f(x + static_cast<long long>(t) * p.stride_t +
                       static_cast<long long>(e) * p.stride_e);
      }
    }
  }
  if (p.scoring == 0) {
    // PyTorch softmax_warp_forward: lane max, butterfly max, exp, lane sum in `it` order,
    // butterfly sum, divide.
    float m = v[0];
#pragma unroll
    for (int it = 1; it < ITER; ++it) m = (m > v[it]) ? m : v[it];
#pragma unroll
    for (int off = WS / 2; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(kFull, m, off, WS);
      m = (m < o) ? o : m;
    }
    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      s[it] = expf(v[it] - m);
      sum += s[it];
    }
#pragma unroll
    for (int off = WS / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off, WS);
    softmax_divide<ITER>(s, sum);
    if (rs != nullptr) {
      rs->m = m;
      rs->sum = sum;
    }
  } else {
#pragma unroll
    for (int it = 0; it < ITER; ++it) s[it] = 1.0f / (1.0f + expf(-v[it]));
  }

  float sel[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const int e = it * WS + sub;
    sel[it] = s[it];
    if (p.bias != nullptr && e < p.E) sel[it] = s[it] + p.bias[e];
  }

  if (p.num_groups > 0) {
    // Grouped top-k: group score = max (no bias) or sum of the two best biased scores;
    // NaN anywhere in a group makes its score NaN, which ranks as +inf; ties -> lower group.
    const int ng = p.num_groups;
    const int gs = p.E / ng;
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const int e = it * WS + sub;
      if (e < p.E) scr.sel[e] = sel[it];
    }
    __syncwarp();
    for (int g = sub; g < ng; g += WS) {
      const float* q = scr.sel + g * gs;
      bool has_nan = false;
      float a = -INFINITY, b = -INFINITY;
      for (int j = 0; j < gs; ++j) {
        const float y = q[j];
        if (y != y) {
          has_nan = true;
        } else if (y > a) {
          b = a;
          a = y;
        } else if (y > b) {
          b = y;
        }
      }
      const float score = (p.bias != nullptr && gs >= 2) ? a + b : a;
      scr.gkey[g] = has_nan ? order_key(INFINITY) : order_key(score);
    }
    __syncwarp();
    for (int g = sub; g < ng; g += WS) {
      const uint32_t kg = scr.gkey[g];
      int rank = 0;
      for (int g2 = 0; g2 < ng; ++g2) {
        const uint32_t k2 = scr.gkey[g2];
        rank += (k2 > kg) || (k2 == kg && g2 < g);
      }
      scr.gsel[g] = rank < p.topk_group ? 1 : 0;
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const int e = it * WS + sub;
      if (e < p.E && scr.gsel[e / gs] == 0) sel[it] = -INFINITY;
    }
    if (rs != nullptr) {
      uint32_t mask = 0u;
      for (int g = 0; g < ng && g < 32; ++g) mask |= static_cast<uint32_t>(scr.gsel[g] != 0) << g;
      rs->gmask = mask;
    }
    __syncwarp();
  }

#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const bool in_e = it * WS + sub < p.E;
    const float q = sel[it];
    // rkey = order_key(torch.nan_to_num(q, nan=-inf)): NaN -> -inf, +inf -> FLT_MAX,
    // -inf -> -FLT_MAX. order_key is monotone and every finite key lies in
    // [order_key(-FLT_MAX), order_key(FLT_MAX)] = [0x00800000, 0xff7fffff], so the infinities'
    // replacements are a clamp of the key, and NaN's is order_key(-inf) = 0x007fffff
    // (select-free integer form of the float chain; same keys bit for bit).
    const uint32_t k = order_key(q);
    const uint32_t kc = k < 0x00800000u ? 0x00800000u : (k > 0xff7fffffu ? 0xff7fffffu : k);
    rkey[it] = in_e ? ((q != q) ? 0x007fffffu : kc) : 0u;
    pkey[it] = (tok_valid && in_e && q > -INFINITY) ? k : 0u;
  }
}

// Writes slot `slot` (< k) of row t when `store`: the weight w (divided by the k winners' sum
// wsum when renormalising, then scaled) and the expert id.
__device__ __forceinline__ void store_slot(const Params& p, long long t, int slot, bool store,
                                           int id, float w, float wsum) {
  if (!store) return;
  if (p.renormalize) w = w / wsum;
  if (p.apply_scale) w = w * p.scale;
  p.out_w[t * p.top_k + slot] = w;
  p.out_ids[t * p.top_k + slot] = id;
}

// Whether a whole-warp row of E experts (next power of two 512) runs with 12 `it` slots per
// lane instead of 16: E in 257..384, where the slots 12..15 (experts >= 384) of the next power of two would be padding only, and
// dropping them leaves every score bit for bit equal. Softmax (PyTorch's layout pads with
// -inf): a -inf pad leaves the lane's running max unchanged unless that max is NaN (a NaN
// logit), and adds exp(-inf - m) = +0 to the lane sum unless m = -inf (every logit -inf); in
// both exceptions the real experts already make the row's sum NaN (exp(NaN) or
// exp(-inf + inf)), so every score is NaN either way. Sigmoid is per element.
__host__ __device__ constexpr bool fits_iter12(int E) { return E > 256 && E <= 384; }

// Steps 4-5 for one row (token t) held by a segment of WS lanes; all lanes of the warp call
// this together. k rounds of a segment-wide max over the row-order keys: first among the
// picked experts (best first), then, once those are taken, among the rest (best first);
// equal keys go to the lower expert id. `weight_of(it, sub)` is called by every lane with
// segment-uniform arguments and returns the weight score s of expert it * WS + sub (the
// three-launch route kernel shuffles it from registers, the one-launch kernel reads it from
// shared memory). Lane j < k of the segment writes slot j of row t when row_in.
template <int WS, int ITER, typename WeightOf>
__device__ __forceinline__ void route_row(const Params& p, int t, bool row_in, int sub,
                                          int seg_base, const bool (&picked)[ITER],
                                          const uint32_t (&rkey)[ITER], WeightOf weight_of) {
  const unsigned seg_mask = (WS == 32) ? kFull : (((1u << WS) - 1u) << seg_base);
  uint32_t cur[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) cur[it] = picked[it] ? rkey[it] : 0u;
  bool fallback = false;
  int my_id = 0;
  float my_w = 0.0f, wsum = 0.0f;
  const int k = p.top_k;
  for (int j = 0; j < k; ++j) {
    uint32_t lm = cur[0];
#pragma unroll
    for (int it = 1; it < ITER; ++it) lm = lm > cur[it] ? lm : cur[it];
    uint32_t m = segment_max<WS>(lm);
    // Every picked expert of this row is taken: fill the rest with the best unpicked
    // experts. Rows of one warp switch at different rounds, so the switch is per segment
    // but the re-reduction below is executed by the whole warp.
    const bool switch_now = (m == 0u) && !fallback;
    if (__any_sync(kFull, switch_now)) {
      if (switch_now) {
        fallback = true;
#pragma unroll
        for (int it = 0; it < ITER; ++it) cur[it] = picked[it] ? 0u : rkey[it];
      }
      lm = cur[0];
#pragma unroll
      for (int it = 1; it < ITER; ++it) lm = lm > cur[it] ? lm : cur[it];
      m = segment_max<WS>(lm);
    }
    // Lowest expert id holding m: lowest `it`, then lowest lane.
    int win_it = -1, win_sub = 0;
    if constexpr (WS == 32) {
      uint32_t cand = 0xffffffffu;
#pragma unroll
      for (int it = ITER - 1; it >= 0; --it) {
        if (cur[it] == m) cand = static_cast<uint32_t>(it * 32 + sub);
      }
      const uint32_t wid = __reduce_min_sync(kFull, cand);
      win_it = static_cast<int>(wid >> 5);
      win_sub = static_cast<int>(wid & 31u);
    } else {
#pragma unroll
      for (int it = 0; it < ITER; ++it) {
        const unsigned b = __ballot_sync(kFull, cur[it] == m) & seg_mask;
        if (win_it < 0 && b != 0u) {
          win_it = it;
          win_sub = __ffs(b) - 1 - seg_base;
        }
      }
    }
    const float w = weight_of(win_it, win_sub);
    if (sub == win_sub) {
#pragma unroll
      for (int it = 0; it < ITER; ++it) {
        if (it == win_it) cur[it] = 0u;
      }
    }
    if (sub == j) {
      my_id = win_it * WS + win_sub;
      my_w = w;
    }
    wsum += w;
  }
  store_slot(p, t, sub, row_in && sub < k, my_id, my_w, wsum);
}

// Batcher's odd-even merge sort network on next_pow2(n) inputs, restricted to the
// comparators (a, b), a < b, with b < n: the inputs n.. would be minimal constants that no
// comparator moves (each puts the larger value at the lower index), so the restricted
// network sorts n inputs. net_pair(n, i, 0 / 1) is comparator i's a / b; net_pair(n, -1, 0)
// is the number of comparators. Evaluated at compile time only (template arguments).
constexpr int net_pair(int n, int idx, int which) {
  int m = 1;
  while (m < n) m <<= 1;
  int cnt = 0;
  for (int p = 1; p < m; p <<= 1) {
    for (int k = p; k >= 1; k >>= 1) {
      for (int j = k % p; j + k < m; j += 2 * k) {
        for (int i = 0; i < k && i + j + k < m; ++i) {
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n) {
            if (cnt == idx) return which ? i + j + k : i + j;
            ++cnt;
          }
        }
      }
    }
  }
  return cnt;
}

// Compare-exchange: the larger of c[A], c[B] to c[A], the other to c[B] (as x ^ y ^ max:
// one 3-input LOP3 per word instead of a second compare and select).
template <int A, int B, int N>
__device__ __forceinline__ void cmp_swap(unsigned long long (&c)[N]) {
  const unsigned long long x = c[A], y = c[B];
  const unsigned long long hi = x > y ? x : y;
  c[A] = hi;
  c[B] = x ^ y ^ hi;
}

template <int N, std::size_t... I>
__device__ __forceinline__ void sort_desc_net(unsigned long long (&c)[N], std::index_sequence<I...>) {
  (cmp_swap<net_pair(N, static_cast<int>(I), 0), net_pair(N, static_cast<int>(I), 1)>(c), ...);
}

// Sorts c descending with a static network (all register indices compile-time constants).
template <int N>
__device__ __forceinline__ void sort_desc(unsigned long long (&c)[N]) {
  sort_desc_net(c, std::make_index_sequence<net_pair(N, -1, 0)>{});
}

// route_row for a whole-warp row (WS == 32), same result bit for bit, in two steps:
// sorted_composites, then sorted_rounds. route_row's order of the k winners is: the picked
// experts by (rkey desc, expert id asc), then (once every picked expert is taken) the other
// experts e < E by (rkey desc, id asc); rkey > 0 for e < E, rkey = 0 for padding e >= E, never
// chosen (k <= E). That is the descending order of the composite
//   c = picked << 63 | rkey << 31 | (0x7fffffff - e)    (c = 0 for rkey == 0)
// (distinct for distinct e, since e < 512). sorted_composites: each lane builds and sorts its
// ITER composites once (expert it * 32 + sub in slot it).
template <int ITER>
__device__ __forceinline__ void sorted_composites(int sub, const bool (&picked)[ITER],
                                                  const uint32_t (&rkey)[ITER],
                                                  unsigned long long (&c)[ITER]) {
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const uint32_t e = static_cast<uint32_t>(it * 32 + sub);
    const unsigned long long v = (static_cast<unsigned long long>(picked[it]) << 63) |
                                 (static_cast<unsigned long long>(rkey[it]) << 31) |
                                 static_cast<unsigned long long>(0x7fffffffu - e);
    c[it] = rkey[it] != 0u ? v : 0ull;
  }
  sort_desc(c);
}

// sorted_rounds: the k rounds over the lanes' sorted composites of row t (all 32 lanes of the
// warp call it together). `head` is the lane's largest composite not yet taken; `pop(me)` is
// called by every lane each round and, where `me`, replaces it by the lane's next one (0 when
// none is left). A round is a warp max over the heads (high word, then low word among the
// lanes with the maximal high word), the winner id e read from the low word, its lane
// (e & 31) pops. `ws` is the row's weight scores (ws[e] = s of expert e,
// e < E; read only at winners, in round order so wsum is summed as route_row sums it); at
// least one lane must hold a non-zero composite in each of the k rounds (k <= E experts with
// rkey > 0), else the winner id is out of range. Lane j < k writes slot j of row t when row_in.
template <typename Pop>
__device__ __forceinline__ void sorted_rounds(const Params& p, int t, bool row_in, int sub,
                                              unsigned long long& head, const float* ws, Pop pop) {
  int my_id = 0;
  float my_w = 0.0f, wsum = 0.0f;
  const int k = p.top_k;
  for (int j = 0; j < k; ++j) {
    const uint32_t hh = static_cast<uint32_t>(head >> 32);
    const uint32_t hl = static_cast<uint32_t>(head);
    const uint32_t mh = __reduce_max_sync(kFull, hh);
    const uint32_t ml = __reduce_max_sync(kFull, hh == mh ? hl : 0u);
    const int win = static_cast<int>(0x7fffffffu - (ml & 0x7fffffffu));
    const float w = ws[win];
    pop(sub == (win & 31));
    if (sub == j) {
      my_id = win;
      my_w = w;
    }
    wsum += w;
  }
  store_slot(p, t, sub, row_in && sub < k, my_id, my_w, wsum);
}

// The rounds with the sorted composites c kept in registers: a pop shifts them by one.
template <int ITER>
__device__ __forceinline__ void sorted_rounds(const Params& p, int t, bool row_in, int sub,
                                              unsigned long long (&c)[ITER], const float* ws) {
  sorted_rounds(p, t, row_in, sub, c[0], ws, [&](bool me) {
    if (me) {
#pragma unroll
      for (int i = 0; i + 1 < ITER; ++i) c[i] = c[i + 1];
      c[ITER - 1] = 0ull;
    }
  });
}

// The rounds with the lane's composites c[1..ITER-1] parked in the warp's shared slice `lst`
// (ITER * 32 entries, lane-interleaved): a pop is a select of the lane's next entry, which
// every lane loads at the start of the round (off the rounds' dependency chain), instead of an
// ITER-long register shift (the route kernel, where the rounds are most of the instructions).
template <int ITER>
__device__ __forceinline__ void sorted_rounds_shared(const Params& p, int t, bool row_in, int sub,
                                                     unsigned long long (&c)[ITER],
                                                     unsigned long long* lst, const float* ws) {
#pragma unroll
  for (int i = 1; i < ITER; ++i) lst[i * 32 + sub] = c[i];
  __syncwarp();
  const unsigned long long* q = lst + 32 + sub;  // the lane's next entry
  const unsigned long long* const qend = lst + ITER * 32;
  unsigned long long head = c[0];
  sorted_rounds(p, t, row_in, sub, head, ws, [&](bool me) {
    const unsigned long long nxt = q < qend ? *q : 0ull;
    head = me ? nxt : head;
    q += me ? 32 : 0;
  });
}

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` when that is above `allowed` (the
// caller's static, one per kernel instantiation, starting at the default 48 KB). A host-side
// function attribute: capture-safe, normally set by the first (eager) call.
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes, size_t& allowed) {
  if (bytes <= allowed) return;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  allowed = bytes;
}

// Launch configuration with optional programmatic dependent launch (PDL: the kernel may
// start while the previous one in the stream finishes; it waits in grid_dependency_wait).
struct LaunchCfg {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[1];
  LaunchCfg(dim3 grid, dim3 block, size_t smem, bool pdl, cudaStream_t stream) : cfg{} {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
  }
};

}  // namespace ec
