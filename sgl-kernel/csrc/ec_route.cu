// Expert-choice steps 4-5: per-token top-k over (picked, score, -expert id), weights.
//
// Recomputes the row's scores from the logits (cheaper than reading them back), marks the
// experts whose threshold the token clears, then ec_device.cuh route_row: k rounds of a
// segment-wide max, picked experts first. Lane j of the segment keeps slot j, so k <= WS.
// With token_choice = 1 the pick is skipped: this is then a fused token-choice top-k
// (the benchmark's yardstick, same scoring code).
//
// With WS == 32 and ITER >= 2 (E > 32) the k rounds use route_row_sorted below instead of
// route_row (so does the one-launch kernel ec_fused.cu;
// the sort and the rounds are ec_device.cuh sorted_composites / sorted_rounds); rows of
// 257..384 experts run with ITER = 12 instead of 16 (fits_iter12 in ec_device.cuh). Both
// measured on an H200 on 2026-11-30: bit-exact with the reference and the one-launch kernel,
// route kernel 68.9 -> 57.7 us at T = 32768, E = 256 and 148.0 -> 88.0 us at E = 384
// (docs/benchmarks.md). From ITER = 8 up the rounds pop each lane's next composite from
// shared memory (sorted_rounds_shared) instead of shifting ITER registers; together with
// row_scores' contiguous loads and select-free keys: route kernel 57.8 -> 48.5 us at
// T = 32768, E = 256, 88.2 -> 73.9 at E = 384 (H200, 2026-11-30 fourth session).
#include "ec_device.cuh"

namespace ec {

// route_row for a whole-warp row (WS == 32), same result bit for bit (sorted_composites and
// sorted_rounds in ec_device.cuh). The weights s go to the warp's slice `ws` of shared memory
// (ws[e] = s of expert e) that the rounds read.
template <int ITER>
__device__ __forceinline__ void route_row_sorted(const Params& p, int t, bool row_in, int sub,
                                                 const bool (&picked)[ITER],
                                                 const uint32_t (&rkey)[ITER],
                                                 const float (&s)[ITER], float* ws,
                                                 unsigned long long* lst) {
  unsigned long long c[ITER];
  sorted_composites<ITER>(sub, picked, rkey, c);
  __syncwarp();  // the previous row's reads of ws and lst are done
#pragma unroll
  for (int it = 0; it < ITER; ++it) ws[it * 32 + sub] = s[it];
  // Pops from shared memory from ITER = 8 up; the register shift is as fast below (H200,
  // 2026-11-30 fourth session: route kernel 21.1 vs 22.7 us at T = 32768, E = 64).
  if constexpr (ITER >= 8) {
    sorted_rounds_shared<ITER>(p, t, row_in, sub, c, lst, ws);  // syncs the warp before its reads
  } else {
    __syncwarp();
    sorted_rounds<ITER>(p, t, row_in, sub, c, ws);
  }
}

// Minimum resident CTAs per SM asked of ptxas (0 = none): 8 (<= 64 registers) at ITER = 8
// and 6 (<= 80) at ITER = 12 fit without spills with route_row_sorted (sm_90a, nvcc 13).
template <int WS, int ITER>
constexpr int route_min_blocks() {
  return WS == 32 ? (ITER == 8 ? 8 : (ITER == 12 ? 6 : 0)) : 0;
}

template <int WS, int ITER, typename scalar_t>
__global__ void __launch_bounds__(128, (route_min_blocks<WS, ITER>())) ec_route_kernel(const Params p) {
  constexpr int P = WS * ITER;
  constexpr int RPW = 32 / WS;
  constexpr int PW = 32 * ITER;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int seg = lane / WS;
  const int sub = lane % WS;
  const int seg_base = seg * WS;

  // Weight scores of the warp's row (route_row_sorted); one element for WS < 32 (unused).
  __shared__ float wsm[4][(WS == 32 && ITER >= 2) ? 32 * ITER : 1];
  // Each lane's sorted composites past its head (route_row_sorted), per warp.
  __shared__ unsigned long long lsm[4][(WS == 32 && ITER >= 8) ? 32 * ITER : 1];
  GroupScratch scr{nullptr, nullptr, nullptr};
  if (p.num_groups > 0) {
    float* sel = reinterpret_cast<float*>(smem) + warp * PW + seg * P;
    uint32_t* gk = reinterpret_cast<uint32_t*>(smem + sizeof(float) * 4 * PW) + warp * PW + seg * P;
    unsigned char* gs = smem + 8 * 4 * PW + warp * PW + seg * P;
    scr = GroupScratch{sel, gk, gs};
  }

  grid_dependency_wait();
  const long long tv = num_valid_rows(p);
  unsigned long long thr[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const int e = it * WS + sub;
    thr[it] = (!p.token_choice && e < p.E) ? p.thr[e] : ~0ull;
  }
  const int stride = gridDim.x * 4 * RPW;
  for (int base = (blockIdx.x * 4 + warp) * RPW; base < p.T; base += stride) {
    const int t = base + seg;
    const bool row_in = t < p.T;
    float s[ITER];
    uint32_t rkey[ITER], pkey[ITER];
    row_scores<WS, ITER, scalar_t>(p, t, sub, row_in, row_in && t < tv, scr, s, rkey, pkey);

    bool picked[ITER];
#pragma unroll
    for (int it = 0; it < ITER; ++it) picked[it] = pkey[it] != 0u && pick_composite(pkey[it], t) >= thr[it];
    if constexpr (WS == 32 && ITER >= 2) {
      route_row_sorted<ITER>(p, t, row_in, sub, picked, rkey, s, wsm[warp], lsm[warp]);
      continue;
    }
    // The weight score of the winner, shuffled from the lane that holds it.
    auto weight_of = [&](int win_it, int win_sub) {
      float w_local = 0.0f;
      if (sub == win_sub) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
          if (it == win_it) w_local = s[it];
        }
      }
      return __shfl_sync(kFull, w_local, seg_base + win_sub);
    };
    route_row<WS, ITER>(p, t, row_in, sub, seg_base, picked, rkey, weight_of);
  }
}

template <int WS, int ITER, typename scalar_t>
static void launch_route_t(const Params& p, bool pdl, cudaStream_t stream) {
  constexpr int RPW = 32 / WS;
  const int rows_per_cta = 4 * RPW;
  int blocks = (p.T + rows_per_cta - 1) / rows_per_cta;
  // One row group per warp up to 8192 CTAs (a grid of one wave of resident CTAs, each warp
  // looping over rows, was slower: T = 65536, E = 256: 248.0 vs 237.2 us for the three
  // launches; H200, 2026-11-30 fourth session).
  if (blocks > 8192) blocks = 8192;
  if (blocks < 1) blocks = 1;
  size_t smem = 0;
  if (p.num_groups > 0) smem = 4 * 32 * ITER * (sizeof(float) + sizeof(uint32_t) + 1);
  LaunchCfg lc(dim3(blocks), dim3(128), smem, pdl, stream);
  cudaLaunchKernelEx(&lc.cfg, ec_route_kernel<WS, ITER, scalar_t>, p);
}

template <typename scalar_t>
static void launch_route_pow2(const Params& p, int pow2, bool pdl, cudaStream_t stream) {
  switch (pow2) {
    case 1: launch_route_t<1, 1, scalar_t>(p, pdl, stream); break;
    case 2: launch_route_t<2, 1, scalar_t>(p, pdl, stream); break;
    case 4: launch_route_t<4, 1, scalar_t>(p, pdl, stream); break;
    case 8: launch_route_t<8, 1, scalar_t>(p, pdl, stream); break;
    case 16: launch_route_t<16, 1, scalar_t>(p, pdl, stream); break;
    case 32: launch_route_t<32, 1, scalar_t>(p, pdl, stream); break;
    case 64: launch_route_t<32, 2, scalar_t>(p, pdl, stream); break;
    case 128: launch_route_t<32, 4, scalar_t>(p, pdl, stream); break;
    case 256: launch_route_t<32, 8, scalar_t>(p, pdl, stream); break;
    case 512:
      if (fits_iter12(p.E)) {
        launch_route_t<32, 12, scalar_t>(p, pdl, stream);
      } else {
        launch_route_t<32, 16, scalar_t>(p, pdl, stream);
      }
      break;
    default: break;
  }
}

void launch_route(const Params& p, int kind, int pow2, bool pdl, cudaStream_t stream) {
  switch (kind) {
    case kFloat32: launch_route_pow2<float>(p, pow2, pdl, stream); break;
    case kFloat16: launch_route_pow2<__half>(p, pow2, pdl, stream); break;
    case kBFloat16: launch_route_pow2<__nv_bfloat16>(p, pow2, pdl, stream); break;
    default: break;
  }
}

}  // namespace ec
