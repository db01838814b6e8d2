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
// Experimental, OFF by default: $SGLANG_MOE_EC_SHORT_SELECT_MAX_T = "1024" or "2048" extends
// the warp-per-expert select to columns of that many tokens (2 warps per CTA, so E / 2 CTAs
// spread over the SMs); unset / "" / "256" = today's rule; other values are an error
// (ec_ops.cpp). Same thresholds bit for bit (the same warp_select_threshold). Aim: the
// block-wide select takes 4.7-5.2 us at T = 1024 (H200, 2026-11-30). Not yet run on a GPU.
//
// Experimental, OFF by default: $SGLANG_MOE_EC_SELECT_CLUSTER = "2" or "4" runs, for
// T > 4096 on Hopper or later, ec_select_cluster_kernel instead: a thread-block cluster of
// that many CTAs per expert, each streaming a contiguous slice of the column, with the
// histograms summed across the cluster through distributed shared memory (same thresholds,
// bit for bit). Unset / "" / "0": ec_select_kernel as before; any other value is an error
// (checked per call in ec_ops.cpp). Read on the host at each call (a CUDA graph keeps the
// kernel it captured). Not yet measured on a GPU.
#include <cooperative_groups.h>

#include "ec_device.cuh"
#include "ec_warp_select.cuh"

namespace cg = cooperative_groups;

namespace ec {

constexpr int kSelectCap = 4096;       // candidates kept in shared memory (default)
constexpr int kSelectCapLarge = 16384; // few experts: 128 KB of candidates

// The radix starts below the top L bits that every eligible key shares (mx, mn: the
// column's largest and smallest eligible key); low_bits: the bits of ~t that vary over t < T.
__device__ __forceinline__ void radix_start(uint32_t mx, uint32_t mn, int T,
                                            unsigned long long& prefix,
                                            unsigned long long& pmask, int& shift,
                                            int& low_bits) {
  const int L = (mx == mn) ? 32 : __clz(mx ^ mn);
  prefix = L == 0 ? 0ull : (static_cast<unsigned long long>(mx >> (32 - L)) << (64 - L));
  pmask = L == 0 ? 0ull : (~0ull << (64 - L));
  shift = 64 - L;
  low_bits = T <= 1 ? 0 : 32 - __clz(static_cast<uint32_t>(T - 1));
}

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
    radix_start(mx, mn, p.T, prefix, pmask, shift, low_bits);
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

// Address of `p` (this CTA's shared memory) in CTA `rank`'s window of the cluster's shared
// memory, and a load from such an address (32-bit addresses: fewer registers than the
// generic pointers of cluster.map_shared_rank).
__device__ __forceinline__ uint32_t dsmem_addr(const void* p, uint32_t rank) {
  uint32_t r = 0u;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
#endif
  return r;
}

__device__ __forceinline__ uint32_t ld_dsmem(uint32_t addr) {
  uint32_t v = 0u;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
#endif
  return v;
}

// The same radix select with a cluster of CS CTAs per expert (grid E * CS, cluster dim CS):
// CTA `rank` streams the column slice [lo, hi) (S tokens, a multiple of 32, per rank) and
// caches its own candidates; the min / max / count and every digit's histogram are summed
// over the cluster (distributed shared memory), and every CTA runs the same scan on the
// same sums, so all agree on each digit without a broadcast. The sums equal the one-CTA
// kernel's histograms, hence the same threshold. The candidate decision uses the cluster's
// bin count (>= any CTA's share) against the per-CTA capacity, so it is cluster-uniform.
// Two histogram buffers, alternating by digit: a CTA clears one only after the cluster
// barrier that follows every CTA's reads of it (the previous digit's), so each digit needs
// one cluster barrier (histograms complete) and two CTA barriers (clear; selected bin), and
// one more cluster barrier before exit (no CTA leaves while another reads its memory).
// The code repeats ec_select_kernel's rather than sharing device functions with it: moving
// those lines into inlined helpers changed ec_select_kernel's SASS (nvcc 13, sm_90a), and
// the default kernels were to stay byte-identical (radix_start alone leaves it unchanged).
template <int BITS, int THREADS, int U, int CS>
__global__ void __launch_bounds__(THREADS, THREADS >= 1024 ? 1 : 2)
    ec_select_cluster_kernel(const Params p, int cand_cap) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  constexpr int NB = 1 << BITS;
  constexpr int BPT = NB / THREADS;  // bins per thread in the scan
  constexpr int NW = THREADS / 32;
  static_assert(BPT >= 1, "need at least one bin per thread");
  __shared__ uint32_t hist2[2][NB];
  extern __shared__ unsigned long long cand[];  // [cand_cap], this CTA's slice only
  __shared__ uint32_t warp_tot[NW];
  __shared__ int s_ncand;
  __shared__ uint32_t s_bin, s_above, s_cnt;
  __shared__ uint32_t s_stat[3];  // this CTA's max, min, count of eligible keys

  cg::cluster_group cluster = cg::this_cluster();
  grid_dependency_wait();
  const int rank = static_cast<int>(cluster.block_rank());
  const int e = static_cast<int>(blockIdx.x) / CS;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const bool writer = rank == 0 && tid == 0;
  const uint32_t* col = p.keysT + static_cast<long long>(e) * p.T;
  const int S = ((p.T + CS - 1) / CS + 31) & ~31;
  const int lo = rank * S < p.T ? rank * S : p.T;
  const int hi = p.T - lo < S ? p.T : lo + S;
  const long long tv = num_valid_rows(p);
  const long long cap = capacity_of(p, tv);
  if (cap <= 0) {  // cluster-uniform; no shared memory was touched
    if (writer) p.thr[e] = ~0ull;  // nothing is picked
    return;
  }
  if (tid == 0) s_ncand = 0;

  unsigned long long prefix = 0ull, pmask = 0ull;
  uint32_t r = static_cast<uint32_t>(cap);  // rank (1-based) still wanted inside the prefix
  bool cached = false;
  bool collect = S <= cand_cap;
  int shift = 64;
  int low_bits = 32;  // bits of ~t that vary over t < T
  {
    __shared__ uint32_t s_mx[NW], s_mn[NW], s_ne[NW];
    ColStats st;
    for (int t0 = lo; t0 < hi; t0 += THREADS * U) {
      uint32_t kk[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = t0 + u * THREADS + tid;
        kk[u] = t < hi ? col[t] : 0u;
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
    if (tid == 0) {
      uint32_t mx = 0u, mn = 0xffffffffu, ne = 0u;
      for (int w = 0; w < NW; ++w) {
        mx = s_mx[w] > mx ? s_mx[w] : mx;
        mn = s_mn[w] < mn ? s_mn[w] : mn;
        ne += s_ne[w];
      }
      s_stat[0] = mx;
      s_stat[1] = mn;
      s_stat[2] = ne;
    }
    cluster.sync();
    uint32_t mx = 0u, mn = 0xffffffffu, ne = 0u;
#pragma unroll
    for (int c = 0; c < CS; ++c) {
      const uint32_t* q = cluster.map_shared_rank(s_stat, c);
      mx = q[0] > mx ? q[0] : mx;
      mn = q[1] < mn ? q[1] : mn;
      ne += q[2];
    }
    if (cap >= static_cast<long long>(ne)) {
      cluster.sync();  // the other CTAs' reads of s_stat are done
      if (writer) p.thr[e] = 1ull;  // every eligible token is picked
      return;
    }
    radix_start(mx, mn, p.T, prefix, pmask, shift, low_bits);
  }
  // Shared-window (32-bit) addresses of every CTA's histograms in the cluster.
  uint32_t hs[CS];
#pragma unroll
  for (int c = 0; c < CS; ++c) hs[c] = dsmem_addr(hist2, c);
  int buf = 0;  // histogram buffer of this digit
  while (true) {
    if (shift == 32) {
      const unsigned long long fix =
          low_bits >= 32 ? 0ull : ((0xffffffffull >> low_bits) << low_bits);
      prefix |= fix;
      pmask |= fix;
      shift = low_bits;
      if (shift == 0) break;
    }
    const int dlo = shift > 32 ? 32 : 0;  // digits never straddle the two words
    const int width = (shift - dlo) < BITS ? (shift - dlo) : BITS;
    shift -= width;
    const unsigned long long dmask = (1ull << width) - 1ull;
    uint32_t* hist = hist2[buf];
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
      for (int t0 = lo; t0 < hi; t0 += THREADS * U) {
        uint32_t kk[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int t = t0 + u * THREADS + tid;
          kk[u] = t < hi ? col[t] : 0u;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int t = t0 + u * THREADS + tid;
          uint32_t bin = 0xffffffffu;
          unsigned long long c = 0ull;
          if (t < hi) {
            c = pick_composite(kk[u], t);
            if ((c & pmask) == prefix) bin = static_cast<uint32_t>((c >> shift) & dmask);
          }
          if (bin != 0xffffffffu) atomicAdd(&hist[bin], 1u);
          if (collect) {  // warp-aggregated append (collect is cluster-uniform)
            const unsigned want = __ballot_sync(kFull, bin != 0xffffffffu);
            int base = 0;
            if (want != 0u && lane == __ffs(want) - 1) base = atomicAdd(&s_ncand, __popc(want));
            base = __shfl_sync(kFull, base, want != 0u ? __ffs(want) - 1 : 0);
            if (bin != 0xffffffffu) cand[base + __popc(want & ((1u << lane) - 1u))] = c;
          }
        }
      }
    }
    cluster.sync();  // every CTA's histogram of this digit is complete
    if (collect) cached = true;
    collect = false;

    // The cluster's histogram (sum over the CS CTAs), scanned from the top bin down.
    uint32_t loc[BPT];
    uint32_t lsum = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
      const uint32_t off = 4u * static_cast<uint32_t>(buf * NB + NB - 1 - (tid * BPT + j));
      uint32_t v = 0u;
#pragma unroll
      for (int c = 0; c < CS; ++c) v += ld_dsmem(hs[c] + off);
      loc[j] = v;
      lsum += v;
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
    buf ^= 1;
    // No CTA barrier needed here: s_bin and warp_tot are next written after the next
    // digit's cluster barrier, the other buffer was last read before this digit's.
  }
  if (writer) p.thr[e] = prefix;
  cluster.sync();  // every other CTA's reads of this CTA's histograms (and s_stat) are done
#endif
}

// Short columns: one warp per expert, WARPS per CTA, columns of up to MAXT tokens; the column
// is copied into shared memory once, then ec_warp_select.cuh (also used by the one-launch
// kernel, ec_fused.cu). Default <8, kShortSelectMaxT>; <2, 1024> and <2, 2048> are the
// experimental longer columns of $SGLANG_MOE_EC_SHORT_SELECT_MAX_T.
template <int WARPS, int MAXT>
__global__ void __launch_bounds__(WARPS * 32) ec_select_short_kernel(const Params p) {
  __shared__ __align__(16) uint32_t hist_all[WARPS][256];
  __shared__ uint32_t col_all[WARPS][MAXT];
  grid_dependency_wait();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * WARPS + warp;
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

// Cluster variant: CS CTAs per expert. CTAs of 1024 threads (one per SM: 146 KB of shared
// memory) while the E * CS CTAs fit one wave of an H200 in clusters (132 SMs in 8 GPCs of
// >= 16: at most 128 CTAs in clusters of 4), else CTAs of 512 threads with half the
// candidate slots (two per SM).
template <int BITS, int THREADS, int U, int CS>
static void launch_select_cluster_t(const Params& p, bool pdl, cudaStream_t stream,
                                    int cand_cap) {
  auto kernel = ec_select_cluster_kernel<BITS, THREADS, U, CS>;
  const size_t smem = sizeof(unsigned long long) * static_cast<size_t>(cand_cap);
  static int opted_in = 0;  // per instantiation, once per process (first call is eager)
  if (smem > 48 * 1024 && opted_in < static_cast<int>(smem)) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
    opted_in = static_cast<int>(smem);
  }
  LaunchCfg lc(dim3(p.E * CS), dim3(THREADS), smem, pdl, stream);
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1] = lc.attr[0];  // PDL, as configured by LaunchCfg
  lc.cfg.attrs = attr;
  lc.cfg.numAttrs = pdl ? 2 : 1;
  cudaLaunchKernelEx(&lc.cfg, kernel, p, cand_cap);
}

template <int CS>
static void launch_select_cluster(const Params& p, bool pdl, cudaStream_t stream) {
  if (p.E * CS <= 128) {
    launch_select_cluster_t<11, 1024, 4, CS>(p, pdl, stream, kSelectCapLarge);
  } else {
    launch_select_cluster_t<11, 512, 4, CS>(p, pdl, stream, kSelectCapLarge / 2);
  }
}

template <int WARPS, int MAXT>
static void launch_select_short(const Params& p, bool pdl, cudaStream_t stream) {
  LaunchCfg lc(dim3((p.E + WARPS - 1) / WARPS), dim3(WARPS * 32), 0, pdl, stream);
  cudaLaunchKernelEx(&lc.cfg, ec_select_short_kernel<WARPS, MAXT>, p);
}

void launch_select(const Params& p, bool pdl, cudaStream_t stream, SelectOpts opts) {
  if (p.T <= kShortSelectMaxT) {
    launch_select_short<8, kShortSelectMaxT>(p, pdl, stream);
    return;
  }
  // Experimental longer warp-per-expert columns ($SGLANG_MOE_EC_SHORT_SELECT_MAX_T).
  if (p.T <= opts.short_max_t) {
    if (p.T <= 1024) {
      launch_select_short<2, 1024>(p, pdl, stream);
    } else {
      launch_select_short<2, 2048>(p, pdl, stream);
    }
    return;
  }
  // Experimental cluster variant ($SGLANG_MOE_EC_SELECT_CLUSTER, see the top of this file).
  if (opts.cluster != 0 && p.T > 4096 && device_info().major >= 9) {
    if (opts.cluster == 2) {
      launch_select_cluster<2>(p, pdl, stream);
    } else {
      launch_select_cluster<4>(p, pdl, stream);
    }
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
