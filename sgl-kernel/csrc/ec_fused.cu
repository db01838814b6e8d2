// Expert-choice routing in ONE launch for small problems (the default for T <= 128 and
// T * E <= 16384, python/sglang_moe_routing/expert_choice/cuda.py).
//
// One thread-block cluster of CS = 8 CTAs of 16 warps on Hopper. CTA `rank` owns rows
// [rank * R, rank * R + R), R = ceil(T / CS).
//   phase 1 (score): each warp scores its rows (ec_device.cuh row_scores, the same float
//     operations as the three-launch path) and keeps, in its CTA's shared memory, the pick
//     keys transposed keys[e][r], the weight scores s[r][e] and the row-order keys rkey[r][e];
//   cluster barrier;
//   phase 2 (select): expert e is owned by CTA e % CS, one warp per expert: the warp gathers
//     the expert's column from every CTA's shared memory (distributed shared memory), finds
//     the threshold (ec_warp_select.cuh) and stores it into every CTA's shared memory;
//   cluster barrier;
//   phase 3 (route): each warp routes the rows it scored (ec_device.cuh route_row), from
//     shared memory (no second read of the logits, no recomputation); for E > 32 by the
//     sorted rounds (ec_device.cuh sorted_composites / sorted_rounds, as the three-launch
//     route kernel's route_row_sorted; H200, 2026-11-30: bit-exact, 0-13% faster at
//     T = 32 / 128 than route_row here).
// No global workspace is touched except thr (kept for tests) and, with write_keys, keysT.
#include <cooperative_groups.h>

#include "ec_device.cuh"
#include "ec_warp_select.cuh"

namespace cg = cooperative_groups;

namespace ec {

constexpr int kFusedWarps = 16;
constexpr int kClusterSize = 8;  // portable cluster size (16 CTAs was measured slower)

struct FusedLayout {
  int R;    // rows per CTA
  int LD;   // leading dimension of keys[e][r] (odd: conflict-free column reads)
  int nsw;  // warps per CTA that own experts in phase 2
  size_t off_thr, off_hist, off_keys, off_s, off_rk, off_col, off_grp, total;
};

__host__ __device__ __forceinline__ size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

__host__ __device__ __forceinline__ FusedLayout fused_layout(int T, int E, int CS, int iter,
                                                             bool groups) {
  FusedLayout L;
  L.R = (T + CS - 1) / CS;
  L.LD = L.R | 1;
  const int per = (E + CS - 1) / CS;
  L.nsw = per < kFusedWarps ? per : kFusedWarps;
  size_t o = 0;
  L.off_thr = o;
  o = align16(o + sizeof(unsigned long long) * E);
  L.off_hist = o;
  o = align16(o + sizeof(uint32_t) * 256 * L.nsw);
  L.off_keys = o;
  o = align16(o + sizeof(uint32_t) * static_cast<size_t>(E) * L.LD);
  L.off_s = o;
  o = align16(o + sizeof(float) * static_cast<size_t>(L.R) * E);
  L.off_rk = o;
  o = align16(o + sizeof(uint32_t) * static_cast<size_t>(L.R) * E);
  L.off_col = o;
  o = align16(o + sizeof(uint32_t) * static_cast<size_t>(L.nsw) * T);
  L.off_grp = o;
  if (groups) o = align16(o + static_cast<size_t>(kFusedWarps) * 32 * iter * 9);
  L.total = o;
  return L;
}

template <int WS, int ITER, typename scalar_t>
__global__ void __launch_bounds__(kFusedWarps * 32, 1) ec_fused_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  constexpr int RPW = 32 / WS;
  constexpr int NW = kFusedWarps;
  constexpr int PW = 32 * ITER;
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int CS = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const FusedLayout L = fused_layout(p.T, p.E, CS, ITER, p.num_groups > 0);
  unsigned long long* thr_s = reinterpret_cast<unsigned long long*>(smem + L.off_thr);
  uint32_t* hist_all = reinterpret_cast<uint32_t*>(smem + L.off_hist);
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem + L.off_keys);
  float* srow = reinterpret_cast<float*>(smem + L.off_s);
  uint32_t* rk = reinterpret_cast<uint32_t*>(smem + L.off_rk);
  uint32_t* colbuf = reinterpret_cast<uint32_t*>(smem + L.off_col);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int seg = lane / WS;
  const int sub = lane % WS;
  const int seg_base = seg * WS;
  const int E = p.E;
  const int R = L.R;
  const int LD = L.LD;
  const int tbase = rank * R;

  GroupScratch scr{nullptr, nullptr, nullptr};
  if (p.num_groups > 0) {
    unsigned char* base = smem + L.off_grp;
    float* sel = reinterpret_cast<float*>(base) + warp * PW + seg * (WS * ITER);
    uint32_t* gk = reinterpret_cast<uint32_t*>(base + sizeof(float) * NW * PW) + warp * PW +
                   seg * (WS * ITER);
    unsigned char* gs = base + 8 * NW * PW + warp * PW + seg * (WS * ITER);
    scr = GroupScratch{sel, gk, gs};
  }

  const long long tv = num_valid_rows(p);

  // Phase 1: scores of this CTA's rows into shared memory.
  for (int r0 = warp * RPW; r0 < R; r0 += NW * RPW) {
    const int r = r0 + seg;
    const int t = tbase + r;
    const bool row_in = (r < R) && (t < p.T);
    float s[ITER];
    uint32_t rkey[ITER], pkey[ITER];
    row_scores<WS, ITER, scalar_t>(p, t, sub, row_in, row_in && t < tv, scr, s, rkey, pkey);
    if (r < R) {
#pragma unroll
      for (int it = 0; it < ITER; ++it) {
        const int e = it * WS + sub;
        if (e < E) {
          keys[e * LD + r] = pkey[it];
          srow[r * E + e] = s[it];
          rk[r * E + e] = rkey[it];
          if (p.write_keys && row_in) p.keysT[static_cast<long long>(e) * p.T + t] = pkey[it];
        }
      }
    }
  }
  cluster.sync();

  // Phase 2: one warp per expert; expert e lives on CTA e % CS.
  if (warp < L.nsw) {
    const long long cap = capacity_of(p, tv);
    uint32_t* col = colbuf + warp * p.T;
    uint32_t* h = hist_all + warp * 256;
    for (int e = rank + CS * warp; e < E; e += CS * L.nsw) {
      // Gather the column from every CTA's shared memory (distributed shared memory).
      const ColStats st = copy_column(col, p.T, lane, [&](int t) {
        const int c = t / R;
        return cluster.map_shared_rank(keys, c)[e * LD + (t - c * R)];
      });
      const unsigned long long th = warp_select_threshold(col, p.T, cap, st, h, lane);
      if (lane < CS) cluster.map_shared_rank(thr_s, lane)[e] = th;
      if (lane == 0) p.thr[e] = th;
      __syncwarp();
    }
  }
  cluster.sync();

  // Phase 3: route this CTA's rows.
  unsigned long long thr[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const int e = it * WS + sub;
    thr[it] = e < E ? thr_s[e] : ~0ull;
  }
  for (int r0 = warp * RPW; r0 < R; r0 += NW * RPW) {
    const int r = r0 + seg;
    const int t = tbase + r;
    const bool row_ok = r < R;
    const bool row_in = row_ok && (t < p.T);
    uint32_t rkey[ITER];
    bool picked[ITER];
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const int e = it * WS + sub;
      const bool ok = row_ok && e < E;
      rkey[it] = ok ? rk[r * E + e] : 0u;
      const uint32_t pk = ok ? keys[e * LD + r] : 0u;
      picked[it] = pk != 0u && pick_composite(pk, t) >= thr[it];
    }
    if constexpr (WS == 32 && ITER >= 2) {  // E > 32: the sorted rounds
      // The row's weight scores srow[r * E + e] are the rounds' ws[e] as they are. A row is
      // the whole warp here (r = r0 < R, so row_ok holds); a row past R would have only zero
      // composites (winner id out of range), so it is skipped, by the whole warp at once
      // (warp-uniform: no lane is left out of the rounds' warp reductions).
      if (!row_ok) continue;
      unsigned long long c[ITER];
      sorted_composites<ITER>(sub, picked, rkey, c);
      sorted_rounds<ITER>(p, t, row_in, sub, c, srow + r * E);
      continue;
    }
    // The weight score of the winner, from shared memory (rows past R, the last CTA's
    // tail, read a valid address and are never written).
    auto weight_of = [&](int win_it, int win_sub) {
      const int win_e = win_it * WS + win_sub;
      return srow[(row_ok ? r : 0) * E + (win_e < E ? win_e : 0)];
    };
    route_row<WS, ITER>(p, t, row_in, sub, seg_base, picked, rkey, weight_of);
  }
#endif
}

DeviceInfo device_info() {
  // Per device (at most 64 devices), read once; host-side queries only (capture-safe).
  static DeviceInfo cache[64];
  static bool have[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return DeviceInfo{};
  if (!have[dev]) {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = d;
    have[dev] = true;
  }
  return cache[dev];
}

template <int WS, int ITER, typename scalar_t>
static bool launch_fused_t(const Params& p, const DeviceInfo& dev, cudaStream_t stream) {
  constexpr int CS = kClusterSize;
  const FusedLayout L = fused_layout(p.T, p.E, CS, ITER, p.num_groups > 0);
  if (L.total > static_cast<size_t>(dev.smem_optin)) return false;
  auto kernel = ec_fused_kernel<WS, ITER, scalar_t>;
  static size_t allowed = 48 * 1024;  // per instantiation: the device's whole opt-in, once
  allow_smem(kernel, static_cast<size_t>(dev.smem_optin), allowed);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(CS);
  cfg.blockDim = dim3(kFusedWarps * 32);
  cfg.dynamicSmemBytes = L.total;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, p);
  return true;
}

template <typename scalar_t>
static bool launch_fused_pow2(const Params& p, int pow2, const DeviceInfo& dev,
                              cudaStream_t stream) {
  switch (pow2) {
    case 1: return launch_fused_t<1, 1, scalar_t>(p, dev, stream);
    case 2: return launch_fused_t<2, 1, scalar_t>(p, dev, stream);
    case 4: return launch_fused_t<4, 1, scalar_t>(p, dev, stream);
    case 8: return launch_fused_t<8, 1, scalar_t>(p, dev, stream);
    case 16: return launch_fused_t<16, 1, scalar_t>(p, dev, stream);
    case 32: return launch_fused_t<32, 1, scalar_t>(p, dev, stream);
    case 64: return launch_fused_t<32, 2, scalar_t>(p, dev, stream);
    case 128: return launch_fused_t<32, 4, scalar_t>(p, dev, stream);
    case 256: return launch_fused_t<32, 8, scalar_t>(p, dev, stream);
    case 512: return launch_fused_t<32, 16, scalar_t>(p, dev, stream);
    default: return false;
  }
}

bool launch_fused(const Params& p, int kind, int pow2, cudaStream_t stream) {
  if (p.token_choice || p.T < 1 || p.T > kFusedMaxT) return false;
  const DeviceInfo dev = device_info();
  if (dev.major < 9) return false;  // thread-block clusters: Hopper and later
  switch (kind) {
    case kFloat32: return launch_fused_pow2<float>(p, pow2, dev, stream);
    case kFloat16: return launch_fused_pow2<__half>(p, pow2, dev, stream);
    case kBFloat16: return launch_fused_pow2<__nv_bfloat16>(p, pow2, dev, stream);
    default: return false;
  }
}

}  // namespace ec
