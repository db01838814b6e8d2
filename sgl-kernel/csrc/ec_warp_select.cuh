// Expert-choice step 3 for short columns: one warp finds one expert's capacity threshold.
//
// Used by the single-launch cluster kernel (ec_fused.cu) and by the three-launch path's
// short-column select (ec_select.cu, T <= kShortSelectMaxT). Same result as ec_select.cu's
// block-wide select (the C-th largest composite `key << 32 | ~t`), cheaper per pass:
//   * no __match_any_sync: each warp owns a private 256-bin histogram and adds with plain
//     shared atomics (the digits below are spread, so same-address conflicts are rare);
//   * the leading bits every eligible key shares (common prefix of the column's largest and
//     smallest non-zero key: sign and most exponent bits) are skipped, so the first 8-bit
//     digit already separates the keys; in the token-index word only the low
//     ceil(log2(T)) bits vary (~t of t < T), the rest is skipped too;
//   * when the capacity covers every eligible token the threshold is 1 (no pass at all).
#pragma once

#include "ec_device.cuh"

namespace ec {

// Per-lane statistics of a column: largest and smallest non-zero key, non-zero count.
struct ColStats {
  uint32_t mx = 0u;
  uint32_t mn = 0xffffffffu;
  uint32_t ne = 0u;
  __device__ __forceinline__ void add(uint32_t k) {
    if (k != 0u) {
      mx = k > mx ? k : mx;
      mn = k < mn ? k : mn;
      ++ne;
    }
  }
};

// Copy a column of T pick keys into this warp's shared buffer `col`, 8 loads in flight per
// lane, and return this lane's statistics of it. `load(t)` reads key t (global memory for
// the three-launch select, another CTA's shared memory for the one-launch kernel).
template <typename Load>
__device__ __forceinline__ ColStats copy_column(uint32_t* col, int T, int lane, Load load) {
  ColStats st;
  for (int t0 = 0; t0 < T; t0 += 256) {
    uint32_t v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int t = t0 + u * 32 + lane;
      v[u] = t < T ? load(t) : 0u;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int t = t0 + u * 32 + lane;
      if (t < T) {
        col[t] = v[u];
        st.add(v[u]);
      }
    }
  }
  __syncwarp();
  return st;
}

// Threshold (composite, uniform over the warp) of the column `col[0, T)` (pick keys,
// 0 = not eligible) held in shared memory. `st` holds this lane's statistics of the
// column; `hist` is this warp's 256-entry (16-byte aligned) shared histogram.
// Every token whose key is non-zero and whose composite is >= the result is picked:
// exactly the `cap` best eligible tokens (ties: lower index), all of them if fewer.
__device__ __forceinline__ unsigned long long warp_select_threshold(
    const uint32_t* col, int T, long long cap, ColStats st, uint32_t* hist, int lane) {
  if (cap <= 0) return ~0ull;  // nothing is picked
  const uint32_t mx = __reduce_max_sync(kFull, st.mx);
  const uint32_t mn = __reduce_min_sync(kFull, st.mn);
  const uint32_t ne = __reduce_add_sync(kFull, st.ne);
  if (cap >= static_cast<long long>(ne)) return 1ull;  // every eligible token is picked
  // All eligible keys share their top L bits (those of mx); keys of 0 rank below them all.
  const int L = (mx == mn) ? 32 : __clz(mx ^ mn);
  unsigned long long prefix =
      L == 0 ? 0ull : (static_cast<unsigned long long>(mx >> (32 - L)) << (64 - L));
  unsigned long long pmask = L == 0 ? 0ull : (~0ull << (64 - L));
  const int b = T <= 1 ? 0 : 32 - __clz(static_cast<uint32_t>(T - 1));  // varying bits of ~t
  uint32_t r = static_cast<uint32_t>(cap);  // rank (1-based) still wanted inside the prefix
  int shift = 64 - L;
  while (true) {
    if (shift == 32) {
      // The key word is decided: ~t for t < T has its top 32 - b bits set.
      const unsigned long long fix = b >= 32 ? 0ull : ((0xffffffffull >> b) << b);
      prefix |= fix;
      pmask |= fix;
      shift = b;
      if (shift == 0) break;
    }
    const int lo = shift > 32 ? 32 : 0;  // digits never straddle the two words
    const int width = (shift - lo) < 8 ? (shift - lo) : 8;
    shift -= width;
    const uint32_t dmask = (1u << width) - 1u;
    reinterpret_cast<uint4*>(hist)[2 * lane] = make_uint4(0u, 0u, 0u, 0u);
    reinterpret_cast<uint4*>(hist)[2 * lane + 1] = make_uint4(0u, 0u, 0u, 0u);
    __syncwarp();
    for (int t = lane; t < T; t += 32) {
      const unsigned long long c = pick_composite(col[t], t);
      if ((c & pmask) == prefix) atomicAdd(&hist[static_cast<uint32_t>(c >> shift) & dmask], 1u);
    }
    __syncwarp();
    // Lane l owns bins 255 - 8l .. 248 - 8l (scanned from the top bin down).
    const uint4 hi = *reinterpret_cast<const uint4*>(hist + 252 - 8 * lane);
    const uint4 lo4 = *reinterpret_cast<const uint4*>(hist + 248 - 8 * lane);
    const uint32_t loc[8] = {hi.w, hi.z, hi.y, hi.x, lo4.w, lo4.z, lo4.y, lo4.x};
    uint32_t lsum = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) lsum += loc[i];
    uint32_t incl = lsum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint32_t o = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += o;
    }
    uint32_t run = incl - lsum;
    int fb = -1;
    uint32_t fa = 0, fc = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (run < r && r <= run + loc[i]) {
        fb = 255 - (lane * 8 + i);
        fa = run;
        fc = loc[i];
      }
      run += loc[i];
    }
    const unsigned who = __ballot_sync(kFull, fb >= 0);
    const int src = __ffs(who) - 1;
    const uint32_t bin = static_cast<uint32_t>(__shfl_sync(kFull, fb, src));
    const uint32_t above = __shfl_sync(kFull, fa, src);
    const uint32_t cnt = __shfl_sync(kFull, fc, src);
    r -= above;
    prefix |= static_cast<unsigned long long>(bin) << shift;
    pmask |= static_cast<unsigned long long>(dmask) << shift;
    if (r == cnt || shift == 0) break;  // the whole bin is taken: threshold = its minimum
    __syncwarp();
  }
  return prefix;
}

}  // namespace ec
