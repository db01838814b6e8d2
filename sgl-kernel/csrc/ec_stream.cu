// Expert-choice step 3 for large T without the [E, T] key matrix: the logits are streamed
// two times here (plus once more by the route kernel), and only O(E * bins + E * capc)
// bytes of workspace are written.
//
//   pass 1  ec_stream_hist_kernel: rows as in ec_score.cu (ec_device.cuh row_scores,
//           bit-exact keys); each eligible (t, e) adds 1 to bin stream_bin(key) of expert e
//           in a per-CTA shared-memory histogram [E][nb]; the CTA flushes the non-zero bins
//           to the global histogram with 64-bit atomics (two bins per atomic). Each row's
//           softmax max and sum and kept-group mask are stored (16 bytes per row), so that
//           later passes recompute any single element's key without the row reductions.
//   bin     the last CTA of pass 1 to finish (a counter): one warp per expert scans its bins
//           from the top and finds the bin holding the C-th best key (C from
//           num_token_non_padded, on the device) and the rank r inside it; thr = 1 (all
//           eligible) / ~0 (none) are written directly.
//   pass 2  ec_stream_collect_kernel: element-wise over the logits (elem_pick_key, the same
//           float operations as row_scores); every composite (key << 32 | ~t) that falls
//           into its expert's threshold bin is appended to the expert's candidate list (at
//           most capc; the bin's exact count is known, so an expert whose bin holds more
//           never collects and is marked "overflow").
//   final   ec_stream_final_kernel: one CTA per expert, radix select (8-bit digits over the
//           64-bit composite) of the r-th largest candidate; composites are distinct, so the
//           threshold is that composite exactly. Overflow experts (many equal keys, or an
//           unusually dense bin) run the same radix select over their column's keys
//           recomputed from the logits and the row statistics (up to 8 strided passes over
//           the column: slower, exact).
// The threshold has the meaning of the three-launch path's (pick iff key != 0 and
// composite >= thr), so the route kernel (ec_route.cu) is reused unchanged.
//
// Bins: value bins of the order key, 32 binades from 2^-30 up (nb = 64 / 128 / 256: halves,
// quarters, eighths of a binade); every key below 2^-30 (tiny, zero, negative) is bin 0 and
// every key >= 4 is bin nb - 1. Any monotone binning is exact (the bins only decide which
// tokens become candidates); these keep the threshold bin small for softmax / sigmoid
// scores.
#include "ec_device.cuh"

namespace ec {
namespace {

constexpr uint32_t kBinLoKey = 0xB0800000u;  // order_key(2^-30)

__device__ __forceinline__ int stream_bin(uint32_t key, int sh, int nb) {
  if (key < kBinLoKey) return 0;
  const uint32_t b = (key - kBinLoKey) >> sh;
  return b < static_cast<uint32_t>(nb) ? static_cast<int>(b) : nb - 1;
}

template <int ITER>
struct HistCfg {
  static constexpr int THREADS = ITER >= 16 ? 512 : 1024;
};

constexpr int kFinalThreads = 256;

__host__ __device__ __forceinline__ size_t align16s(size_t x) { return (x + 15) & ~size_t(15); }

// Per-warp scratch of row_scores for grouped top-k (as ec_score.cu lays it out).
template <int WS, int ITER>
__device__ __forceinline__ GroupScratch group_scratch(const Params& p, unsigned char* base,
                                                      int nwarps, int warp, int seg) {
  constexpr int PW = 32 * ITER;
  constexpr int P = WS * ITER;
  if (p.num_groups <= 0) return GroupScratch{nullptr, nullptr, nullptr};
  float* sel = reinterpret_cast<float*>(base) + warp * PW + seg * P;
  uint32_t* gk = reinterpret_cast<uint32_t*>(base + sizeof(float) * nwarps * PW) + warp * PW + seg * P;
  unsigned char* gs = base + 8 * nwarps * PW + warp * PW + seg * P;
  return GroupScratch{sel, gk, gs};
}

// Warp-wide: bins ordered from the top (j = 0 is the largest), lane l holding j in
// [l * per_lane, l * per_lane + per_lane), count(j) their counts. In the one lane whose bin
// holds the element of rank r (1-based, from the top), returns that j and sets `above` (the
// count of the bins before it) and `cnt` (its count); elsewhere returns -1.
template <typename Count>
__device__ __forceinline__ int warp_rank_bin(Count count, int per_lane, long long r,
                                             long long& above, long long& cnt) {
  const int lane = threadIdx.x & 31;
  uint32_t lsum = 0u;
  for (int i = 0; i < per_lane; ++i) lsum += count(lane * per_lane + i);
  uint32_t incl = lsum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  long long run = static_cast<long long>(incl - lsum);
  int found = -1;
  for (int i = 0; i < per_lane; ++i) {
    const int j = lane * per_lane + i;
    const long long c = count(j);
    if (found < 0 && run < r && r <= run + c) {
      found = j;
      above = run;
      cnt = c;
    }
    run += c;
  }
  return found;
}

// One warp, expert e, after every CTA of pass 1 has flushed: the bin holding the C-th best
// key and the rank inside it, or thr = all (1) / none (~0) directly.
__device__ __forceinline__ void bin_scan(const Params& p, const StreamWs& w, int e, long long cap) {
  const int lane = threadIdx.x & 31;
  const uint32_t* h = w.hist + static_cast<long long>(e) * w.nb;
  // From the top bin down; L2 reads (the other CTAs' atomics), not L1.
  const auto count = [&](int j) { return __ldcg(h + (w.nb - 1 - j)); };
  uint32_t lsum = 0u;
  for (int i = 0; i < w.nb / 32; ++i) lsum += count(lane * (w.nb / 32) + i);
  const uint32_t total = __reduce_add_sync(kFull, lsum);
  if (cap <= 0 || cap >= static_cast<long long>(total)) {
    if (lane == 0) {
      p.thr[e] = cap <= 0 ? ~0ull : 1ull;  // nothing / every eligible token is picked
      w.st_mode[e] = 0;
      w.st_bin[e] = -1;
      w.st_r[e] = 0u;
    }
    return;
  }
  long long above = 0, cnt = 0;
  const int j = warp_rank_bin(count, w.nb / 32, cap, above, cnt);  // exists: 0 < cap < total
  if (j >= 0) {
    w.st_bin[e] = w.nb - 1 - j;
    w.st_r[e] = static_cast<uint32_t>(cap - above);
    w.st_mode[e] = cnt <= w.capc ? 1 : 2;
  }
}

template <int WS, int ITER, typename scalar_t>
__global__ void __launch_bounds__(HistCfg<ITER>::THREADS)
    ec_stream_hist_kernel(const Params p, const StreamWs w) {
  constexpr int RPW = 32 / WS;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int seg = lane / WS;
  const int sub = lane % WS;
  const int nwarps = blockDim.x >> 5;
  // Expert e's bins at hist[e * ld + b], ld = nb + 2: the lanes of a row (different
  // experts) mostly hit different banks even when their keys fall into the same bin.
  const int ld = w.nb + 2;
  const int nsm = p.E * ld;
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem);
  for (int i = threadIdx.x; i < nsm; i += blockDim.x) hist[i] = 0u;
  const size_t off = align16s(sizeof(uint32_t) * static_cast<size_t>(nsm));
  const GroupScratch scr = group_scratch<WS, ITER>(p, smem + off, nwarps, warp, seg);
  __syncthreads();

  grid_dependency_wait();
  const long long tv = num_valid_rows(p);
  const int stride = gridDim.x * nwarps * RPW;
  for (int base = (blockIdx.x * nwarps + warp) * RPW; base < p.T; base += stride) {
    const int t = base + seg;
    const bool row_in = t < p.T;
    float s[ITER];
    uint32_t rkey[ITER], pkey[ITER];
    RowStat rs{0.0f, 0.0f, 0u};
    row_scores<WS, ITER, scalar_t>(p, t, sub, row_in, row_in && t < tv, scr, s, rkey, pkey, &rs);
    if (row_in && sub == 0) w.stats[t] = RowStatPacked{rs.m, rs.sum, rs.gmask, 0u};
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const uint32_t k = pkey[it];
      if (k == 0u) continue;  // not eligible (also: e >= E, padding row, row out of range)
      atomicAdd(&hist[(it * WS + sub) * ld + stream_bin(k, w.sh, w.nb)], 1u);
    }
  }
  __syncthreads();
  // Two 32-bit bins per 64-bit atomic (a bin's total is <= T < 2^31: no carry).
  const unsigned long long* h2 = reinterpret_cast<const unsigned long long*>(hist);
  unsigned long long* g2 = reinterpret_cast<unsigned long long*>(w.hist);
  const int half = w.nb / 2;
  for (int i = threadIdx.x; i < p.E * half; i += blockDim.x) {
    const int e = i / half;
    const unsigned long long v = h2[e * (ld / 2) + (i - e * half)];
    if (v != 0ull) atomicAdd(g2 + i, v);
  }
  // The last CTA to finish scans every expert's histogram (saves a launch).
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(w.done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const long long cap = capacity_of(p, tv);
  for (int e = warp; e < p.E; e += nwarps) bin_scan(p, w, e, cap);
}

// The pick key of element (t, e) alone, from the row statistics of pass 1: the float
// operations of row_scores (ec_device.cuh) on that element, so the key is bit-identical.
template <typename scalar_t>
__device__ __forceinline__ uint32_t elem_pick_key(const Params& p, const RowStatPacked& st,
                                                  int t, int e, bool tok_valid) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(p.logits);
  const float v = load_f(x + static_cast<long long>(t) * p.stride_t +
                         static_cast<long long>(e) * p.stride_e);
  const float s = p.scoring == 0 ? expf(v - st.m) / st.sum : 1.0f / (1.0f + expf(-v));
  float q = p.bias != nullptr ? s + p.bias[e] : s;
  if (p.num_groups > 0 && ((st.gmask >> (e / (p.E / p.num_groups))) & 1u) == 0u) q = -INFINITY;
  return (tok_valid && q > -INFINITY) ? order_key(q) : 0u;
}

// Pass 2: element-wise; composites in their expert's threshold bin become candidates.
template <typename scalar_t>
__global__ void __launch_bounds__(256) ec_stream_collect_kernel(const Params p, const StreamWs w) {
  constexpr int U = 4;  // elements in flight per thread
  __shared__ int bsel[512];
  grid_dependency_wait();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) bsel[e] = w.st_mode[e] == 1 ? w.st_bin[e] : -1;
  __syncthreads();
  const long long tv = num_valid_rows(p);
  const uint32_t n = static_cast<uint32_t>(p.T) * static_cast<uint32_t>(p.E);  // < 2^31
  const uint32_t E = static_cast<uint32_t>(p.E);
  const uint32_t step = gridDim.x * blockDim.x * U;
  for (uint32_t i0 = blockIdx.x * blockDim.x * U + threadIdx.x; i0 < n; i0 += step) {
    uint32_t k[U];
    int tt[U], ee[U], bb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t i = i0 + u * blockDim.x;
      k[u] = 0u;
      tt[u] = static_cast<int>(i / E);
      ee[u] = static_cast<int>(i - static_cast<uint32_t>(tt[u]) * E);
      bb[u] = i < n ? bsel[ee[u]] : -1;
      if (bb[u] >= 0) k[u] = elem_pick_key<scalar_t>(p, w.stats[tt[u]], tt[u], ee[u], tt[u] < tv);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k[u] != 0u && stream_bin(k[u], w.sh, w.nb) == bb[u]) {
        const int e = ee[u];
        const uint32_t idx = atomicAdd(&w.ncand[e], 1u);
        if (idx < static_cast<uint32_t>(w.capc)) {
          w.cand[static_cast<long long>(e) * w.capc + idx] = pick_composite(k[u], tt[u]);
        }
      }
    }
  }
}

struct RadixShared {
  uint32_t hist[256];
  uint32_t bin, above, cnt;
  unsigned long long res, all_and, all_or;
};

// The r-th largest (r >= 1) of a set of distinct 64-bit composites, MSB-first digits of up
// to 8 bits, starting below the bits every element shares (one AND/OR pass first).
// `for_each(f)` calls f(c) for every element this thread owns (all threads of the CTA call
// it together; it may use warp collectives with warp-uniform control flow).
template <typename ForEach>
__device__ unsigned long long block_radix_rth(ForEach&& for_each, uint32_t r, RadixShared& sh) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    sh.all_and = ~0ull;
    sh.all_or = 0ull;
  }
  __syncthreads();
  {
    unsigned long long a = ~0ull, o = 0ull;
    for_each([&](unsigned long long c) {
      a &= c;
      o |= c;
    });
    if (a != ~0ull) atomicAnd(&sh.all_and, a);
    if (o != 0ull) atomicOr(&sh.all_or, o);
  }
  __syncthreads();
  const unsigned long long diff = sh.all_and ^ sh.all_or;
  if (diff == 0ull) return sh.all_and;  // a single element
  const int hb = 63 - __clzll(static_cast<long long>(diff));  // highest bit that differs
  const unsigned long long low = hb == 63 ? ~0ull : ((1ull << (hb + 1)) - 1ull);
  unsigned long long prefix = sh.all_and & ~low, pmask = ~low;
  int shift = hb + 1;
  uint32_t cnt = 0u;
  while (true) {
    const int width = shift < 8 ? shift : 8;
    shift -= width;
    const unsigned long long dmask = (1ull << width) - 1ull;
    for (int i = tid; i < 256; i += blockDim.x) sh.hist[i] = 0u;
    if (tid == 0) {
      sh.bin = 0u;
      sh.above = 0u;
      sh.cnt = 1u;
    }
    __syncthreads();
    for_each([&](unsigned long long c) {
      if ((c & pmask) == prefix) atomicAdd(&sh.hist[static_cast<uint32_t>((c >> shift) & dmask)], 1u);
    });
    __syncthreads();
    if (tid < 32) {
      long long above = 0, c = 0;
      const int j = warp_rank_bin([&](int jj) { return sh.hist[255 - jj]; }, 8, r, above, c);
      if (j >= 0) {
        sh.bin = static_cast<uint32_t>(255 - j);
        sh.above = static_cast<uint32_t>(above);
        sh.cnt = static_cast<uint32_t>(c);
      }
    }
    __syncthreads();
    const uint32_t bin = sh.bin;
    r -= sh.above;
    cnt = sh.cnt;
    prefix |= static_cast<unsigned long long>(bin) << shift;
    pmask |= dmask << shift;
    __syncthreads();
    if (cnt <= 1u || shift == 0) break;
  }
  if (shift == 0) return prefix;  // every bit fixed: the element itself
  // One element left with this prefix: read it back.
  if (tid == 0) sh.res = prefix;
  __syncthreads();
  for_each([&](unsigned long long c) {
    if ((c & pmask) == prefix) sh.res = c;
  });
  __syncthreads();
  return sh.res;
}

// One CTA per expert: the exact threshold composite.
template <typename scalar_t>
__global__ void __launch_bounds__(kFinalThreads) ec_stream_final_kernel(const Params p,
                                                                        const StreamWs w) {
  __shared__ RadixShared sh;
  __shared__ unsigned long long cand_s[kStreamCap];
  grid_dependency_wait();
  const int e = blockIdx.x;
  const int mode = w.st_mode[e];
  if (mode == 0) return;  // thr written by bin_scan
  const uint32_t r = w.st_r[e];
  const int tid = threadIdx.x;
  unsigned long long th;
  if (mode == 1) {
    const uint32_t nc = w.ncand[e];
    const int n = nc < static_cast<uint32_t>(w.capc) ? static_cast<int>(nc) : w.capc;
    const unsigned long long* src = w.cand + static_cast<long long>(e) * w.capc;
    for (int i = tid; i < n; i += blockDim.x) cand_s[i] = src[i];
    __syncthreads();
    const unsigned long long* c = cand_s;
    th = block_radix_rth(
        [&](auto&& f) {
          for (int i = tid; i < n; i += blockDim.x) f(c[i]);
        },
        r, sh);
  } else {
    // Overflow: expert e's keys recomputed from its logits column and the row statistics,
    // those in the threshold bin kept.
    const long long tv = num_valid_rows(p);
    const int bstar = w.st_bin[e];
    th = block_radix_rth(
        [&](auto&& f) {
          for (int t = tid; t < p.T; t += blockDim.x) {
            const uint32_t k = elem_pick_key<scalar_t>(p, w.stats[t], t, e, t < tv);
            if (k != 0u && stream_bin(k, w.sh, w.nb) == bstar) f(pick_composite(k, t));
          }
        },
        r, sh);
  }
  if (tid == 0) p.thr[e] = th;
}

int blocks_for(int T, int rows_per_cta, int limit) {
  long long b = (static_cast<long long>(T) + rows_per_cta - 1) / rows_per_cta;
  if (b > limit) b = limit;
  return b < 1 ? 1 : static_cast<int>(b);
}

template <int WS, int ITER, typename scalar_t>
bool launch_stream_t(const Params& p, const StreamWs& w, bool pdl, cudaStream_t stream) {
  constexpr int RPW = 32 / WS;
  constexpr size_t per_warp_scratch = 32 * ITER * 9;  // sel + gkey + gsel
  const DeviceInfo dev = device_info();
  if (dev.sms <= 0 || p.E > 512 || p.num_groups > 32) return false;
  const bool groups = p.num_groups > 0;
  // Pass 1: the histogram needs E * nb * 4 bytes, plus the group scratch per warp.
  const size_t hist_bytes = align16s(sizeof(uint32_t) * static_cast<size_t>(p.E) * (w.nb + 2));
  int nw0 = HistCfg<ITER>::THREADS / 32;
  size_t smem0 = hist_bytes + (groups ? nw0 * per_warp_scratch : 0);
  while (smem0 > static_cast<size_t>(dev.smem_optin) && groups && nw0 > 4) {
    nw0 /= 2;
    smem0 = hist_bytes + nw0 * per_warp_scratch;
  }
  if (smem0 > static_cast<size_t>(dev.smem_optin)) return false;
  auto k0 = ec_stream_hist_kernel<WS, ITER, scalar_t>;
  auto k1 = ec_stream_collect_kernel<scalar_t>;
  static size_t allowed0 = 48 * 1024;  // per instantiation
  allow_smem(k0, smem0, allowed0);
  int occ0 = 0, occ1 = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ0, k0, nw0 * 32, smem0);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ1, k1, 256, 0);
  if (occ0 < 1 || occ1 < 1) return false;

  {
    // At most one CTA per SM: each CTA flushes its whole histogram, so fewer, longer CTAs.
    LaunchCfg lc(dim3(blocks_for(p.T, nw0 * RPW, dev.sms)), dim3(nw0 * 32), smem0, pdl, stream);
    cudaLaunchKernelEx(&lc.cfg, k0, p, w);
  }
  {
    const int per_cta = 256 * 4;
    LaunchCfg lc(dim3(blocks_for(p.T * p.E, per_cta, dev.sms * occ1)), dim3(256), 0, pdl, stream);
    cudaLaunchKernelEx(&lc.cfg, k1, p, w);
  }
  {
    LaunchCfg lc(dim3(p.E), dim3(kFinalThreads), 0, pdl, stream);
    cudaLaunchKernelEx(&lc.cfg, ec_stream_final_kernel<scalar_t>, p, w);
  }
  return true;
}

template <typename scalar_t>
bool launch_stream_pow2(const Params& p, const StreamWs& w, int pow2, bool pdl,
                        cudaStream_t stream) {
  switch (pow2) {
    case 1: return launch_stream_t<1, 1, scalar_t>(p, w, pdl, stream);
    case 2: return launch_stream_t<2, 1, scalar_t>(p, w, pdl, stream);
    case 4: return launch_stream_t<4, 1, scalar_t>(p, w, pdl, stream);
    case 8: return launch_stream_t<8, 1, scalar_t>(p, w, pdl, stream);
    case 16: return launch_stream_t<16, 1, scalar_t>(p, w, pdl, stream);
    case 32: return launch_stream_t<32, 1, scalar_t>(p, w, pdl, stream);
    case 64: return launch_stream_t<32, 2, scalar_t>(p, w, pdl, stream);
    case 128: return launch_stream_t<32, 4, scalar_t>(p, w, pdl, stream);
    case 256: return launch_stream_t<32, 8, scalar_t>(p, w, pdl, stream);
    case 512: return launch_stream_t<32, 16, scalar_t>(p, w, pdl, stream);
    default: return false;
  }
}

}  // namespace

bool launch_stream(const Params& p, const StreamWs& w, int kind, int pow2, bool pdl,
                   cudaStream_t stream) {
  if (p.token_choice || p.T < 1 || w.nb < 32 || w.capc < 1) return false;
  switch (kind) {
    case kFloat32: return launch_stream_pow2<float>(p, w, pow2, pdl, stream);
    case kFloat16: return launch_stream_pow2<__half>(p, w, pow2, pdl, stream);
    case kBFloat16: return launch_stream_pow2<__nv_bfloat16>(p, w, pow2, pdl, stream);
    default: return false;
  }
}

}  // namespace ec
