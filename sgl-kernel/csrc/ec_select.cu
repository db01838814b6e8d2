// Expert-choice step 3: each expert's capacity threshold, by radix select.
//
// One CTA per expert. The column keysT[e, :] gives each token a distinct 64-bit composite
// (pick key << 32 | ~t). The expert's picks are its C largest composites with a non-zero
// key, i.e. exactly the composites >= the C-th largest, which is found MSB-first a digit at
// a time with a shared-memory histogram: no sort, no host sync, C read on the device.
// After each digit the search stops as soon as the whole selected bin is taken (then the
// threshold is the bin's smallest possible value). A column of at most CAP tokens (2 * CAP
// as 32-bit keys in the 1024-thread and cluster kernels: T <= 32768 for E < 132) is kept
// whole in shared memory by the first (min / max) pass; a longer one is streamed from global
// memory until the candidate bin holds <= CAP tokens, which are then kept.
// A min/max pass comes first, so the radix starts below the bits every eligible key shares
// (and skips the constant top bits of ~t): the first digit already spreads the keys.
// Histograms use plain shared atomics, candidate appends are warp-aggregated.
// Short columns (T <= kShortSelectMaxT) take one warp per expert instead
// (ec_warp_select.cuh), which is faster there (timings: docs/benchmarks.md, appendix).
// Longer warp-per-expert columns lose: 2 warps per CTA at T = 1024 took 7.2-8.4 us against
// this kernel's 4.1-5.0 us (H200, 2026-11-30, third session; benchmark/NOTES_ec.md).
//
// Few experts and long columns on Hopper or later: a thread-block cluster of CS CTAs per
// expert, each streaming a contiguous slice of the column, with the histograms summed across
// the cluster through distributed shared memory (same thresholds, bit for bit). CS = 4 for
// E <= 8 at T > 16384, CS = 2 for E <= 384 at T > 32768, else one CTA per expert: the
// cluster's barriers cost ~1 us, which only long slices repay. First measured on the H200,
// 2026-11-30 (third session), graph replay of the three launches, us at T = 8192 / 32768 /
// 65536 for one CTA, CS = 2, CS = 4: E = 8 (k 2) 12.5 / 24.6 / 41.3, 13.3 / 22.9 / 32.0,
// 15.0 / 21.1 / 29.4; E = 32 16.7 / 43.6 / 78.6, 17.6 / 44.1 / 69.0, 30.1 / 52.5 / 82.1;
// E = 64 18.6 / 50.4 / 90.3, 19.7 / 51.3 / 82.6, 40.8 / 73.3 / 108.1 (512-thread CTAs).
// E = 65..384 take CS = 2 since the fifth session of that day (after the key-word histogram
// count below; probe_ec_small_t.py, k 8): T = 65536, one CTA vs CS = 2, E = 128 119.2 vs
// 116.0 us, E = 256 232.5 vs 209.2, E = 384 320.3 vs 304.5; at T = 32768 CS = 2 lost:
// E = 64 41.0 vs 41.1, E = 128 56.9 vs 64.3, E = 256 111.5 vs 118.2, E = 384 166.9 vs 174.4.
// E > 384 was not measured and keeps one CTA. The thresholds between
// the measured T are a choice. $SGLANG_MOE_EC_SELECT_CLUSTER overrides the rule at T > 4096:
// "0" one CTA per expert, "2" / "4" that cluster size; unset or "" = the rule; any other
// value is an error (checked per call in ec_ops.cpp; a CUDA graph keeps the kernel it
// captured).
//
// U (column elements each thread loads before using them): 8 for T > 4096, 4 below. 8 was
// measured against 4 on the H200 (2026-11-30, fourth session; the former
// $SGLANG_MOE_EC_SELECT_UNROLL switch): the same or up to 2% faster at T = 8192..65536,
// E = 64..384 (more loads in flight where few CTAs stream long columns); 32 registers, no
// spills. A first-digit histogram fused into the min / max pass at a sample-predicted radix
// start (the former $SGLANG_MOE_EC_SELECT_FUSED_FIRST_DIGIT) was slower: 47-48 registers,
// T = 32768: E = 128 66.9 -> 71.4 us, E = 384 192.6 -> 220.6 us; removed.
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

// Thread-block-cluster helpers of ec_select_kernel (CS > 1 runs only on sm_90+, where
// launch_select takes it; CS == 1 compiles to the plain one-CTA kernel on every arch).
template <int CS>
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  if constexpr (CS > 1) return static_cast<int>(cg::this_cluster().block_rank());
#endif
  return 0;
}

// CS == 1: a CTA barrier; else a cluster barrier (which also orders shared-memory writes
// before the other CTAs' distributed-shared-memory reads).
template <int CS>
__device__ __forceinline__ void cluster_or_cta_sync() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  if constexpr (CS > 1) {
    cg::this_cluster().sync();
    return;
  }
#else
  if constexpr (CS > 1) __trap();  // never launched below sm_90
#endif
  __syncthreads();
}

// `p` (this CTA's shared memory) in CTA `rank` of the cluster. A generic pointer on purpose:
// ptxas lowers ld.shared::cluster of a 32-bit address to a 64-bit generic load and folded
// part of the 32-bit index arithmetic into the 64-bit offset, so a rank-0 base that dipped
// below 0 carried into the high word (compute-sanitizer on the H200, 2026-11-30 third
// session: out-of-bounds reads at the shared window's high word + 1).
template <int CS>
__device__ __forceinline__ const uint32_t* in_rank(uint32_t* p, int rank) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  if constexpr (CS > 1) return cg::this_cluster().map_shared_rank(p, rank);
#endif
  return p;
}

// The next digit below `shift`: at 32 the constant top bits of ~t are skipped (prefix and
// pmask take them); digits never straddle the two words. Returns false when no bit is left;
// else lowers `shift` to the digit's lowest bit and sets its mask.
__device__ __forceinline__ bool next_digit(unsigned long long& prefix, unsigned long long& pmask,
                                           int& shift, int low_bits, int bits,
                                           unsigned long long& dmask) {
  if (shift == 32) {
    const unsigned long long fix =
        low_bits >= 32 ? 0ull : ((0xffffffffull >> low_bits) << low_bits);
    prefix |= fix;
    pmask |= fix;
    shift = low_bits;
    if (shift == 0) return false;
  }
  const int dlo = shift > 32 ? 32 : 0;
  const int width = (shift - dlo) < bits ? (shift - dlo) : bits;
  shift -= width;
  dmask = (1ull << width) - 1ull;
  return true;
}

// The U keys col[t0 + u * THREADS + tid] (0 at t >= hi) of one streamed tile, all loads issued
// before any is used.
template <int THREADS, int U>
__device__ __forceinline__ void load_tile(const uint32_t* col, int t0, int hi, int tid,
                                          uint32_t (&kk)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int t = t0 + u * THREADS + tid;
    kk[u] = t < hi ? col[t] : 0u;
  }
}

// *addr += 1 in shared memory (a 32-bit shared-window address), no return value.
__device__ __forceinline__ void shared_inc(uint32_t addr) {
  asm volatile("red.shared.add.u32 [%0], 1;" ::"r"(addr) : "memory");
}

// U: column elements each thread loads before using them (memory-level parallelism).
// CS: CTAs per expert (grid E * CS, cluster dim CS when CS > 1). CTA `rank` streams the
// column slice [lo, hi) (S tokens, a multiple of 32, per rank) and caches its own
// candidates; with CS > 1 the min / max / count and every digit's histogram are summed over
// the cluster (distributed shared memory) and every CTA runs the same scan on the same sums,
// so all agree on each digit without a broadcast. The sums equal the one-CTA histograms,
// hence the same threshold. The candidate decision uses the cluster's bin count (>= any
// CTA's share) against the per-CTA capacity, so it is cluster-uniform. CS > 1 keeps two
// histogram buffers, alternating by digit: a CTA clears one only after the cluster barrier
// that follows every CTA's reads of it (the previous digit's), so a digit needs one cluster
// barrier and two CTA barriers, plus one cluster barrier before exit (no CTA leaves while
// another reads its memory). CS == 1: one buffer, a CTA barrier before the next clear.
// One CTA per expert: at most 32 registers (a full SM of threads; the 512-thread kernel needs
// four CTAs per SM for E = 512 in one wave and took 40 after the whole-column cache without
// the bound). Clusters: one CTA per SM is the plan anyway (32 would spill).
template <int BITS, int THREADS, int U, int CS>
__global__ void __launch_bounds__(THREADS, CS > 1 ? 1 : 2048 / THREADS)
    ec_select_kernel(const Params p, int cand_cap) {
  constexpr int NB = 1 << BITS;
  constexpr int BPT = NB / THREADS;  // bins per thread in the scan
  constexpr int NW = THREADS / 32;
  constexpr int NBUF = CS > 1 ? 2 : 1;
  static_assert(BPT >= 1, "need at least one bin per thread");
  __shared__ uint32_t hist2[NBUF][NB];
  extern __shared__ unsigned long long cand[];  // [cand_cap], this CTA's slice only
  __shared__ uint32_t warp_tot[NW];
  __shared__ int s_ncand;
  __shared__ uint32_t s_bin, s_above, s_cnt;

  grid_dependency_wait();
  const int rank = cluster_rank<CS>();
  const int e = static_cast<int>(blockIdx.x) / CS;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const bool writer = rank == 0 && tid == 0;
  const uint32_t* col = p.keysT + static_cast<long long>(e) * p.T;
  const int S = CS == 1 ? p.T : ((p.T + CS - 1) / CS + 31) & ~31;
  const int lo = CS == 1 ? 0 : (rank * S < p.T ? rank * S : p.T);
  const int hi = CS == 1 ? p.T : (p.T - lo < S ? p.T : lo + S);
  const long long tv = num_valid_rows(p);
  const long long cap = capacity_of(p, tv);
  if (cap <= 0) {  // cluster-uniform; no shared memory was touched
    if (writer) p.thr[e] = ~0ull;  // nothing is picked
    return;
  }
  // A slice that fits is cached whole by the min / max pass, so the column is read from global
  // memory once; the digits then filter the cache by the prefix, which gives the same
  // histograms as streaming. kKeyCache: the 32-bit keys at their index (the composite's low
  // word, ~t, is implied by the index), so twice as many tokens fit the candidate slots'
  // memory (T = 32768 with one 1024-thread CTA per expert); else whole composites (the
  // 512-thread one-CTA kernel, which spilled at its 32 registers with the key cache).
  constexpr bool kKeyCache = THREADS >= 1024 || CS > 1;
  const bool whole = S <= (kKeyCache ? 2 : 1) * cand_cap;  // cluster-uniform
  uint32_t* const ckey = reinterpret_cast<uint32_t*>(cand);
  if (tid == 0) s_ncand = whole ? hi - lo : 0;

  unsigned long long prefix = 0ull, pmask = 0ull;
  uint32_t r = static_cast<uint32_t>(cap);  // rank (1-based) still wanted inside the prefix
  bool cached = whole;
  bool collect = false;
  int shift = 64;
  int low_bits = 32;  // bits of ~t that vary over t < T
  {
    __shared__ uint32_t s_mx[NW], s_mn[NW], s_ne[NW];
    ColStats st;
    // The min / max pass; a cached slice also stores every composite at its index. (Two
    // instances of the loop, cached and streamed, made ptxas spill at 32 registers.)
    for (int t0 = lo; t0 < hi; t0 += THREADS * U) {
      uint32_t kk[U];
      load_tile<THREADS, U>(col, t0, hi, tid, kk);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        st.add(kk[u]);
        const int t = t0 + u * THREADS + tid;
        if (whole && t < hi) {
          if constexpr (kKeyCache) {
            ckey[t - lo] = kk[u];
          } else {
            cand[t - lo] = pick_composite(kk[u], t);
          }
        }
      }
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
    if constexpr (CS > 1) {  // the cluster's max, min and count
      __shared__ uint32_t s_stat[3];
      if (tid == 0) {
        s_stat[0] = mx;
        s_stat[1] = mn;
        s_stat[2] = ne;
      }
      cluster_or_cta_sync<CS>();
      mx = 0u, mn = 0xffffffffu, ne = 0u;
#pragma unroll
      for (int c = 0; c < CS; ++c) {
        const uint32_t* q = in_rank<CS>(s_stat, c);
        mx = q[0] > mx ? q[0] : mx;
        mn = q[1] < mn ? q[1] : mn;
        ne += q[2];
      }
    }
    if (cap >= static_cast<long long>(ne)) {
      if constexpr (CS > 1) cluster_or_cta_sync<CS>();  // the others' reads of s_stat are done
      if (writer) p.thr[e] = 1ull;  // every eligible token is picked
      return;
    }
    radix_start(mx, mn, p.T, prefix, pmask, shift, low_bits);
  }
  int buf = 0;  // histogram buffer of this digit
  while (true) {
    unsigned long long dmask = 0ull;
    if (!next_digit(prefix, pmask, shift, low_bits, BITS, dmask)) break;
    uint32_t* hist = hist2[buf];
    for (int i = tid; i < NB; i += THREADS) hist[i] = 0u;
    __syncthreads();
    if (kKeyCache && cached && shift >= 32) {
      // The digit lies in the key word, and the prefix has no bit of ~t yet (its low word and
      // pmask's are 0 until a digit goes below bit 32): the same test and bin on the key alone,
      // 32-bit instead of 64-bit arithmetic per element: ~13 instead of ~23 instructions per
      // cached key (sm_90a); with the shuffle scan of warp_tot below, this kernel at T = 32768,
      // E = 64 went from 14.07 to 10.52 us (H200, 2026-11-30 fifth session; ncu had the count
      // loop at 57% of its instructions). Kernels with the key cache only: the 512-thread
      // kernel spilled at its 32 registers with it.
      const uint32_t pf = static_cast<uint32_t>(prefix >> 32), pm = static_cast<uint32_t>(pmask >> 32);
      const uint32_t dm = static_cast<uint32_t>(dmask);
      const int sh = shift - 32;
      const int n = s_ncand;
      // The histogram's shared-window address once (atomicAdd on the generic pointer re-derived
      // the window base per element).
      const uint32_t hbase = static_cast<uint32_t>(__cvta_generic_to_shared(hist));
      auto count_keys = [&](auto key_at) {
#pragma unroll 4
        for (int i = tid; i < n; i += THREADS) {
          const uint32_t k = key_at(i);
          if ((k & pm) == pf) shared_inc(hbase + 4u * ((k >> sh) & dm));
        }
      };
      if (whole) {  // (kKeyCache holds here)
        count_keys([&](int i) { return ckey[i]; });
      } else {
        count_keys([&](int i) { return static_cast<uint32_t>(cand[i] >> 32); });
      }
    } else if (cached) {
      // The digit's histogram of the cached keys / candidates under the prefix.
      auto count = [&](auto composite_at) {
        const int n = s_ncand;
        for (int i0 = 0; i0 < n; i0 += THREADS) {
          const int i = i0 + tid;
          uint32_t bin = 0xffffffffu;
          if (i < n) {
            const unsigned long long c = composite_at(i);
            if ((c & pmask) == prefix) bin = static_cast<uint32_t>((c >> shift) & dmask);
          }
          if (bin != 0xffffffffu) atomicAdd(&hist[bin], 1u);
        }
      };
      if (kKeyCache && whole) {
        count([&](int i) { return pick_composite(ckey[i], lo + i); });
      } else {
        count([&](int i) { return cand[i]; });
      }
    } else {
      if (THREADS >= 512 && !collect && shift >= 32) {
        // As the cached count above: the test and bin on the 32-bit key while the digit lies
        // in the key word (no append in this digit). Not in the 256-thread kernel, which
        // never streams (whole columns of T <= 4096) and spilled with this copy of the loop.
        // H200, 2026-11-30 fifth session: the 512-thread kernel at T = 32768, E = 256 / 384
        // 34.3 -> 32.1 / 56.1 -> 51.8 us (one loop with both forms spilled instead).
        const uint32_t pf = static_cast<uint32_t>(prefix >> 32), pm = static_cast<uint32_t>(pmask >> 32);
        const uint32_t dm = static_cast<uint32_t>(dmask);
        const int sh = shift - 32;
        for (int t0 = lo; t0 < hi; t0 += THREADS * U) {
          uint32_t kk[U];
          load_tile<THREADS, U>(col, t0, hi, tid, kk);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int t = t0 + u * THREADS + tid;
            if (t < hi && (kk[u] & pm) == pf) atomicAdd(&hist[(kk[u] >> sh) & dm], 1u);
          }
        }
      } else
      for (int t0 = lo; t0 < hi; t0 += THREADS * U) {
        uint32_t kk[U];
        load_tile<THREADS, U>(col, t0, hi, tid, kk);
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
            if (want != 0u && lane == __ffs(want) - 1) {
              base = atomicAdd(&s_ncand, __popc(want));
            }
            base = __shfl_sync(kFull, base, want != 0u ? __ffs(want) - 1 : 0);
            if (bin != 0xffffffffu) cand[base + __popc(want & ((1u << lane) - 1u))] = c;
          }
        }
      }
    }
    cluster_or_cta_sync<CS>();  // every CTA's histogram of this digit is complete
    if (collect) cached = true;
    collect = false;

    // Bin holding the r-th largest: scan the (cluster's) histogram from the top bin down.
    uint32_t loc[BPT];
#pragma unroll
    for (int j = 0; j < BPT; ++j) loc[j] = 0u;
#pragma unroll
    for (int c = 0; c < CS; ++c) {
      const uint32_t* h = in_rank<CS>(hist, c);
#pragma unroll
      for (int j = 0; j < BPT; ++j) loc[j] += h[NB - 1 - (tid * BPT + j)];
    }
    uint32_t lsum = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) lsum += loc[j];
    uint32_t incl = lsum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint32_t o = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += o;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    // Plus the totals of the warps before this one: a shuffle scan of warp_tot (lane w holds
    // warp w's) instead of a serial loop of up to NW - 1 shared-memory loads.
    uint32_t wsum = lane < NW ? warp_tot[lane] : 0u;
    const uint32_t wown = wsum;
#pragma unroll
    for (int off = 1; off < NW; off <<= 1) {
      const uint32_t o = __shfl_up_sync(kFull, wsum, off);
      if (lane >= off) wsum += o;
    }
    uint32_t run = incl - lsum + __shfl_sync(kFull, wsum - wown, warp);
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
    if constexpr (CS > 1) {
      // No barrier: s_bin and warp_tot are next written after the next digit's cluster
      // barrier; the other buffer was last read before this digit's.
      buf ^= 1;
    } else {
      __syncthreads();  // the scan's reads of hist before the next digit clears it
    }
  }
  if (writer) p.thr[e] = prefix;
  if constexpr (CS > 1) cluster_or_cta_sync<CS>();  // the others' reads of this CTA are done
}

// Short columns: one warp per expert, WARPS per CTA, columns of up to MAXT tokens; the column
// is copied into shared memory once, then ec_warp_select.cuh (also used by the one-launch
// kernel, ec_fused.cu).
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

// CS > 1: a cluster of CS CTAs per expert (sm_90+ only).
template <int BITS, int THREADS, int U, int CS = 1>
static void launch_select_t(const Params& p, bool pdl, cudaStream_t stream, int cand_cap) {
  auto kernel = ec_select_kernel<BITS, THREADS, U, CS>;
  const size_t smem = sizeof(unsigned long long) * static_cast<size_t>(cand_cap);
  static size_t allowed = 48 * 1024;  // per instantiation
  allow_smem(kernel, smem, allowed);
  LaunchCfg lc(dim3(p.E * CS), dim3(THREADS), smem, pdl, stream);
  cudaLaunchAttribute attr[2];
  if constexpr (CS > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CS;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1] = lc.attr[0];  // PDL, as configured by LaunchCfg
    lc.cfg.attrs = attr;
    lc.cfg.numAttrs = pdl ? 2 : 1;
  }
  cudaLaunchKernelEx(&lc.cfg, kernel, p, cand_cap);
}

// Clusters of CS CTAs per expert: CTAs of 1024 threads (one per SM: 146 KB of shared memory,
// slices of up to 32768 tokens cached whole as keys), in as many waves as E * CS needs (one
// wave of an H200 holds 128 CTAs in clusters of 4: 132 SMs in 8 GPCs of >= 16). (Until
// 2026-11-30, fourth session, E * CS > 128 took two 512-thread CTAs per SM with half the
// slots, which cached no slice above 8192 tokens.)
template <int CS>
static void launch_select_cluster(const Params& p, bool pdl, cudaStream_t stream) {
  launch_select_t<11, 1024, 8, CS>(p, pdl, stream, kSelectCapLarge);
}

template <int WARPS, int MAXT>
static void launch_select_short(const Params& p, bool pdl, cudaStream_t stream) {
  LaunchCfg lc(dim3((p.E + WARPS - 1) / WARPS), dim3(WARPS * 32), 0, pdl, stream);
  cudaLaunchKernelEx(&lc.cfg, ec_select_short_kernel<WARPS, MAXT>, p);
}

// CTAs per expert at T > 4096 on sm_90+: the variable's value when set, else the rule at the
// top of this file.
static int select_cluster_size(int E, int T, SelectOpts opts) {
  if (opts.cluster >= 0) return opts.cluster == 0 ? 1 : opts.cluster;
  if (E <= 8 && T > 16384) return 4;
  if (E <= 384 && T > 32768) return 2;
  return 1;
}

void launch_select(const Params& p, bool pdl, cudaStream_t stream, SelectOpts opts) {
  if (p.T <= kShortSelectMaxT) {
    launch_select_short<8, kShortSelectMaxT>(p, pdl, stream);
    return;
  }
  if (p.T <= kSelectCap) {  // whole columns (cached by the min / max pass)
    launch_select_t<8, 256, 4>(p, pdl, stream, kSelectCap);
    return;
  }
  // Thread-block clusters per expert (see the top of this file).
  const int cs = device_info().major >= 9 ? select_cluster_size(p.E, p.T, opts) : 1;
  if (cs == 2) {
    launch_select_cluster<2>(p, pdl, stream);
  } else if (cs == 4) {
    launch_select_cluster<4>(p, pdl, stream);
  } else if (p.E < 132) {  // (T > kSelectCap here)
    // With few experts (< one CTA per SM): wider CTAs and 4x the candidates.
    launch_select_t<11, 1024, 8>(p, pdl, stream, kSelectCapLarge);
  } else {
    launch_select_t<11, 512, 8>(p, pdl, stream, kSelectCap);
  }
}

}  // namespace ec
