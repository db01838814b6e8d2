// Expert-choice step 1-2: per-token scores -> pick keys, written transposed keysT[e, t].
//
// One CTA (4 warps) computes a tile of TILE rows, stages the keys in shared memory as
// [E][TILE + 1] and writes each expert's TILE consecutive tokens in one coalesced run.
#include "ec_device.cuh"

namespace ec {

template <int WS, int ITER>
struct ScoreTile {
  static constexpr int P = WS * ITER;
  static constexpr int RPW = 32 / WS;  // rows per warp pass
  static constexpr int MIN_TILE = 4 * RPW;
  static constexpr int TILE = MIN_TILE > (P >= 256 ? 8 : 16) ? MIN_TILE : (P >= 256 ? 8 : 16);
};

template <int WS, int ITER, typename scalar_t>
__global__ void __launch_bounds__(512) ec_score_kernel(const Params p) {
  using Cfg = ScoreTile<WS, ITER>;
  constexpr int TILE = Cfg::TILE;
  constexpr int RPW = Cfg::RPW;
  constexpr int LD = TILE + 1;
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* tile = reinterpret_cast<uint32_t*>(smem);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int seg = lane / WS;
  const int sub = lane % WS;
  const int nwarps = blockDim.x >> 5;

  GroupScratch scr{nullptr, nullptr, nullptr};
  if (p.num_groups > 0) {
    constexpr int PW = 32 * ITER;  // entries per warp (RPW segments of P)
    unsigned char* base = smem + sizeof(uint32_t) * p.E * LD;
    float* sel = reinterpret_cast<float*>(base) + warp * PW + seg * Cfg::P;
    uint32_t* gk = reinterpret_cast<uint32_t*>(base + sizeof(float) * nwarps * PW) + warp * PW + seg * Cfg::P;
    unsigned char* gs = base + 8 * nwarps * PW + warp * PW + seg * Cfg::P;
    scr = GroupScratch{sel, gk, gs};
  }

  grid_dependency_wait();
  const long long tv = num_valid_rows(p);
  const int t0 = blockIdx.x * TILE;
  for (int r0 = warp * RPW; r0 < TILE; r0 += nwarps * RPW) {
    const int r = r0 + seg;
    const int t = t0 + r;
    const bool row_in = (r < TILE) && (t < p.T);
    float s[ITER];
    uint32_t rkey[ITER], pkey[ITER];
    row_scores<WS, ITER, scalar_t>(p, t, sub, row_in, row_in && t < tv, scr, s, rkey, pkey);
    if (r < TILE) {
#pragma unroll
      for (int it = 0; it < ITER; ++it) {
        const int e = it * WS + sub;
        if (e < p.E) tile[e * LD + r] = pkey[it];
      }
    }
  }
  __syncthreads();
  const int n = p.E * TILE;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = i / TILE;
    const int r = i - e * TILE;
    const int t = t0 + r;
    if (t < p.T) p.keysT[static_cast<long long>(e) * p.T + t] = tile[e * LD + r];
  }
}

template <int WS, int ITER, typename scalar_t>
static void launch_score_t(const Params& p, cudaStream_t stream) {
  using Cfg = ScoreTile<WS, ITER>;
  const int blocks = (p.T + Cfg::TILE - 1) / Cfg::TILE;
  // One row group per warp (TILE / RPW warps, 4 to 16): short dependency chains at small T.
  int nw = Cfg::TILE / Cfg::RPW;
  size_t smem = 0;
  while (true) {
    smem = sizeof(uint32_t) * p.E * (Cfg::TILE + 1);
    if (p.num_groups > 0) smem += nw * 32 * ITER * (sizeof(float) + sizeof(uint32_t) + 1);
    if (smem <= 48 * 1024 || nw <= 4) break;
    nw /= 2;  // stay within the default 48 KB of dynamic shared memory
  }
  ec_score_kernel<WS, ITER, scalar_t><<<blocks, 32 * nw, smem, stream>>>(p);
}

template <typename scalar_t>
static void launch_score_pow2(const Params& p, int pow2, cudaStream_t stream) {
  switch (pow2) {
    case 1: launch_score_t<1, 1, scalar_t>(p, stream); break;
    case 2: launch_score_t<2, 1, scalar_t>(p, stream); break;
    case 4: launch_score_t<4, 1, scalar_t>(p, stream); break;
    case 8: launch_score_t<8, 1, scalar_t>(p, stream); break;
    case 16: launch_score_t<16, 1, scalar_t>(p, stream); break;
    case 32: launch_score_t<32, 1, scalar_t>(p, stream); break;
    case 64: launch_score_t<32, 2, scalar_t>(p, stream); break;
    case 128: launch_score_t<32, 4, scalar_t>(p, stream); break;
    case 256: launch_score_t<32, 8, scalar_t>(p, stream); break;
    case 512:  // E in 257..384 with 12 slots per lane (fits_iter12)
      if (fits_iter12(p.E)) {
        launch_score_t<32, 12, scalar_t>(p, stream);
      } else {
        launch_score_t<32, 16, scalar_t>(p, stream);
      }
      break;
    default: break;
  }
}

void launch_score(const Params& p, int kind, int pow2, cudaStream_t stream) {
  switch (kind) {
    case kFloat32: launch_score_pow2<float>(p, pow2, stream); break;
    case kFloat16: launch_score_pow2<__half>(p, pow2, stream); break;
    case kBFloat16: launch_score_pow2<__nv_bfloat16>(p, pow2, stream); break;
    default: break;
  }
}

}  // namespace ec
