// Expert-choice step 3: each expert's capacity threshold, by radix select.
//
// One CTA per expert. The column keysT[e, :] gives each token a distinct 64-bit composite
// (pick key << 32 | ~t). The expert's picks are its C largest composites with a non-zero
// key, i.e. exactly the composites >= the C-th largest, which is found MSB-first a digit at
// a time with a shared-memory histogram: no sort, no host sync, C read on the device.
// After each digit the search stops as soon as the whole selected bin is taken (then the
// threshold is the bin's smallest possible value). The first passes stream the column from
// global memory; once the candidate bin holds <= CAP tokens they are kept in shared memory.
// A min/max pass comes first, so the radix starts below the bits every eligible key shares
// (and skips the constant top bits of ~t): the first digit already spreads the keys.
// Histograms use plain shared atomics, candidate appends are warp-aggregated.
// Short columns (T <= kShortSelectMaxT) take one warp per expert instead
// (ec_warp_select.cuh), which is faster there (timings: docs/benchmarks.md, appendix).
#include "ec_device.cuh"
#include "ec_warp_select.cuh"

namespace ec {

constexpr int kSelectCap = 4096;       // candidates kept in shared memory (default)
constexpr int kSelectCapLarge = 16384; // few experts: 128 KB of candidates

// U: column elements each thread loads before using them (memory-level parallelism).
template <int BITS, int THREADS, int U>
__global__ void __launch_bounds__(THREADS) ec_select_kernel(const Params p, int cand_cap) {
  constexpr int NB = 1 << BITS;
  constexpr int BPT = NB / THREADS;  // bins per thread in the scan
  constexpr int NW = THREADS / 32;
  static_assert(BPT >= 1, "need at least one bin per thread");
  __shared__ uint32_t hist[NB];
  extern __shared__ unsigned long long cand[];  // [cand_cap]
  __shared__ uint32_t warp_tot[NW];
  __shared__ int s_ncand;
  __shared__ uint32_t s_bin, s_above, s_cnt;

  grid_dependency_wait();
  const int e = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const uint32_t* col = p.keysT + static_cast<long long>(e) * p.T;
  const long long tv = num_valid_rows(p);
  const long long cap = capacity_of(p, tv);
  if (cap <= 0) {
    if (tid == 0) p.thr[e] = ~0ull;  // nothing is picked
    return;
  }
  if (tid == 0) s_ncand = 0;

  unsigned long long prefix = 0ull, pmask = 0ull;
  uint32_t r = static_cast<uint32_t>(cap);  // rank (1-based) still wanted inside the prefix
  bool cached = false;
  bool collect = p.T <= cand_cap;
  int shift = 64;
  int low_bits = 32;  // bits of ~t that vary over t < T
  {
    __shared__ uint32_t s_mx[NW], s_mn[NW], s_ne[NW];
    ColStats st;
    for (int t0 = 0; t0 < p.T; t0 += THREADS * U) {
      uint32_t kk[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = t0 + u * THREADS + tid;
        kk[u] = t < p.T ? col[t] : 0u;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) st.add(kk[u]);
    }
    const uint32_t wmx = __reduce_max_sync(kFull, st.mx);
    const uint32_t wmn = __reduce_min_sync(kFull, st.mn);
    const uint32_t wne = __reduce_add_sync(kFull, st.ne);
    if (lane == 0) {
      s_mx[warp] = wmx;
      s_mn[warp] = wmn;
      s_ne[warp] = wne;
    }
    __syncthreads();
    uint32_t mx = 0u, mn = 0xffffffffu, ne = 0u;
    for (int w = 0; w < NW; ++w) {
      mx = s_mx[w] > mx ? s_mx[w] : mx;
      mn = s_mn[w] < mn ? s_mn[w] : mn;
      ne += s_ne[w];
    }
    if (cap >= static_cast<long long>(ne)) {
      if (tid == 0) p.thr[e] = 1ull;  // every eligible token is picked
      return;
    }
    const int L = (mx == mn) ? 32 : __clz(mx ^ mn);
    prefix = L == 0 ? 0ull : (static_cast<unsigned long long>(mx >> (32 - L)) << (64 - L));
    pmask = L == 0 ? 0ull : (~0ull << (64 - L));
    shift = 64 - L;
    low_bits = p.T <= 1 ? 0 : 32 - __clz(static_cast<uint32_t>(p.T - 1));
  }
  while (true) {
    if (shift == 32) {
      const unsigned long long fix =
          low_bits >= 32 ? 0ull : ((0xffffffffull >> low_bits) << low_bits);
      prefix |= fix;
      pmask |= fix;
      shift = low_bits;
      if (shift == 0) break;
    }
    const int lo = shift > 32 ? 32 : 0;  // digits never straddle the two words
    const int width = (shift - lo) < BITS ? (shift - lo) : BITS;
    shift -= width;
    const unsigned long long dmask = (1ull << width) - 1ull;
    for (int i = tid; i < NB; i += THREADS) hist[i] = 0u;
    __syncthreads();
    if (cached) {
      const int n = s_ncand;
      for (int i0 = 0; i0 < n; i0 += THREADS) {
        const int i = i0 + tid;
        uint32_t bin = 0xffffffffu;
        if (i < n) {
          const unsigned long long c = cand[i];
          if ((c & pmask) == prefix) bin = static_cast<uint32_t>((c >> shift) & dmask);
        }
        if (bin != 0xffffffffu) atomicAdd(&hist[bin], 1u);
      }
    } else {
      for (int t0 = 0; t0 < p.T; t0 += THREADS * U) {
        uint32_t kk[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int t = t0 + u * THREADS + tid;
          kk[u] = t < p.T ? col[t] : 0u;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int t = t0 + u * THREADS + tid;
          uint32_t bin = 0xffffffffu;
          unsigned long long c = 0ull;
          if (t < p.T) {
            c = pick_composite(kk[u], t);
            if ((c & pmask) == prefix) bin = static_cast<uint32_t>((c >> shift) & dmask);
          }
          if (bin != 0xffffffffu) atomicAdd(&hist[bin], 1u);
          if (collect) {  // warp-aggregated append (collect is block-uniform)
            const unsigned want = __ballot_sync(kFull, bin != 0xffffffffu);
            int base = 0;
            if (want != 0u && lane == __ffs(want) - 1) base = atomicAdd(&s_ncand, __popc(want));
            base = __shfl_sync(kFull, base, want != 0u ? __ffs(want) - 1 : 0);
            if (bin != 0xffffffffu) cand[base + __popc(want & ((1u << lane) - 1u))] = c;
          }
        }
      }
    }
    __syncthreads();
    if (collect) cached = true;
    collect = false;

    // Bin holding the r-th largest: scan the histogram from the top bin down.
    uint32_t loc[BPT];
    uint32_t lsum = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
      loc[j] = hist[NB - 1 - (tid * BPT + j)];
      lsum += loc[j];
    }
    uint32_t incl = lsum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint32_t o = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += o;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    uint32_t run = incl - lsum;
    for (int w = 0; w < warp; ++w) run += warp_tot[w];
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
      if (run < r && r <= run + loc[j]) {
        s_bin = static_cast<uint32_t>(NB - 1 - (tid * BPT + j));
        s_above = run;
        s_cnt = loc[j];
      }
      run += loc[j];
    }
    __syncthreads();
    const uint32_t bin = s_bin, above = s_above, cnt = s_cnt;
    r -= above;
    prefix |= static_cast<unsigned long long>(bin) << shift;
    pmask |= dmask << shift;
    if (r == cnt || shift == 0) break;  // the whole bin is taken: threshold = its minimum
    if (!cached && cnt <= static_cast<uint32_t>(cand_cap)) collect = true;
    __syncthreads();
  }
  if (tid == 0) p.thr[e] = prefix;
}

// Short columns: one warp per expert, 8 per CTA; the column is copied into shared memory
// once, then ec_warp_select.cuh (also used by the one-launch kernel, ec_fused.cu).
__global__ void __launch_bounds__(256) ec_select_short_kernel(const Params p) {
  __shared__ __align__(16) uint32_t hist_all[8][256];
  __shared__ uint32_t col_all[8][kShortSelectMaxT];
  grid_dependency_wait();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * 8 + warp;
  if (e >= p.E) return;  // whole warp
  const long long tv = num_valid_rows(p);
  const long long cap = capacity_of(p, tv);
  if (cap <= 0) {
    if (lane == 0) p.thr[e] = ~0ull;
    return;
  }
  const uint32_t* src = p.keysT + static_cast<long long>(e) * p.T;
  uint32_t* col = col_all[warp];
  const ColStats st = copy_column(col, p.T, lane, [&](int t) { return src[t]; });
  const unsigned long long th = warp_select_threshold(col, p.T, cap, st, hist_all[warp], lane);
  if (lane == 0) p.thr[e] = th;
}

template <int BITS, int THREADS, int U>
static void launch_select_t(const Params& p, bool pdl, cudaStream_t stream, int cand_cap) {
  const size_t smem = sizeof(unsigned long long) * static_cast<size_t>(cand_cap);
  if (smem > 48 * 1024) {
    // Once per process (normally before any CUDA-graph capture: the first call is eager).
    static int opted_in = 0;
    if (opted_in < static_cast<int>(smem)) {
      cudaFuncSetAttribute(ec_select_kernel<BITS, THREADS, U>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      opted_in = static_cast<int>(smem);
    }
  }
  LaunchCfg lc(dim3(p.E), dim3(THREADS), smem, pdl, stream);
  cudaLaunchKernelEx(&lc.cfg, ec_select_kernel<BITS, THREADS, U>, p, cand_cap);
}

void launch_select(const Params& p, bool pdl, cudaStream_t stream) {
  if (p.T <= kShortSelectMaxT) {
    LaunchCfg lc(dim3((p.E + 7) / 8), dim3(256), 0, pdl, stream);
    cudaLaunchKernelEx(&lc.cfg, ec_select_short_kernel, p);
    return;
  }
  // With few experts (< one CTA per SM): wider CTAs and 4x the candidates.
  const bool few = p.E < 132 && p.T > kSelectCap;
  if (p.T <= 4096) {
    launch_select_t<8, 256, 4>(p, pdl, stream, kSelectCap);
  } else if (few) {
    launch_select_t<11, 1024, 4>(p, pdl, stream, kSelectCapLarge);
  } else {
    launch_select_t<11, 512, 4>(p, pdl, stream, kSelectCap);
  }
}

}  // namespace ec
