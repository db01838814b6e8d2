// Expert-choice steps 4-5: per-token top-k over (picked, score, -expert id), weights.
//
// Recomputes the row's scores from the logits (cheaper than reading them back), marks the
// experts whose threshold the token clears, then takes k rounds of a segment-wide max:
// first among the picked experts (best first), then among the rest (best first); equal
// keys go to the lower expert id. Lane j of the segment keeps slot j, so k <= WS.
// With token_choice = 1 the pick is skipped: this is then a fused token-choice top-k
// (the benchmark's yardstick, same scoring code).
#include "ec_device.cuh"

namespace ec {

template <int WS, int ITER, typename scalar_t>
__global__ void __launch_bounds__(128) ec_route_kernel(const Params p) {
  constexpr int P = WS * ITER;
  constexpr int RPW = 32 / WS;
  constexpr int PW = 32 * ITER;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int seg = lane / WS;
  const int sub = lane % WS;
  const int seg_base = seg * WS;
  const unsigned seg_mask = (WS == 32) ? kFull : (((1u << WS) - 1u) << seg_base);

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
  const int k = p.top_k;
  const int stride = gridDim.x * 4 * RPW;
  for (int base = (blockIdx.x * 4 + warp) * RPW; base < p.T; base += stride) {
    const int t = base + seg;
    const bool row_in = t < p.T;
    float s[ITER];
    uint32_t rkey[ITER], pkey[ITER];
    row_scores<WS, ITER, scalar_t>(p, t, sub, row_in, row_in && t < tv, scr, s, rkey, pkey);

    bool picked[ITER];
    uint32_t cur[ITER];
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      picked[it] = pkey[it] != 0u && pick_composite(pkey[it], t) >= thr[it];
      cur[it] = picked[it] ? rkey[it] : 0u;
    }
    bool fallback = false;
    int my_id = 0;
    float my_w = 0.0f, wsum = 0.0f;
    for (int j = 0; j < k; ++j) {
      uint32_t lm = cur[0];
#pragma unroll
      for (int it = 1; it < ITER; ++it) lm = lm > cur[it] ? lm : cur[it];
      uint32_t m = segment_max<WS>(lm);
      // Every picked expert of this row is taken: fill the rest with the best unpicked
      // experts. Rows of one warp switch at different rounds, so the switch is per
      // segment but the re-reduction below is executed by the whole warp.
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
      if (WS == 32 && (p.variant & 8)) {  // uniform branch; variant bit 3
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
      float w_local = 0.0f;
      if (sub == win_sub) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
          if (it == win_it) {
            w_local = s[it];
            cur[it] = 0u;
          }
        }
      }
      const float w = __shfl_sync(kFull, w_local, seg_base + win_sub);
      if (sub == j) {
        my_id = win_it * WS + win_sub;
        my_w = w;
      }
      wsum += w;
    }
    if (row_in && sub < k) {
      float w = p.renormalize ? my_w / wsum : my_w;
      if (p.apply_scale) w = w * p.scale;
      p.out_w[static_cast<long long>(t) * k + sub] = w;
      p.out_ids[static_cast<long long>(t) * k + sub] = my_id;
    }
  }
}

template <int WS, int ITER, typename scalar_t>
static void launch_route_t(const Params& p, bool pdl, cudaStream_t stream) {
  constexpr int RPW = 32 / WS;
  const int rows_per_cta = 4 * RPW;
  int blocks = (p.T + rows_per_cta - 1) / rows_per_cta;
  if (blocks > 8192) blocks = 8192;
  if (blocks < 1) blocks = 1;
  size_t smem = 0;
  if (p.num_groups > 0) smem = 4 * 32 * ITER * (sizeof(float) + sizeof(uint32_t) + 1);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(128);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, ec_route_kernel<WS, ITER, scalar_t>, p);
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
    case 512: launch_route_t<32, 16, scalar_t>(p, pdl, stream); break;
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
