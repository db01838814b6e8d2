// Expert-choice routing kernels: host-visible parameter block and launcher declarations.
//
// Shared by the PyTorch binding (ec_ops.cpp, host compiler) and the CUDA sources.
// The semantics are those of python/sglang_moe_routing/expert_choice/reference.py.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ec {

enum ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Params {
  // Router logits [T, E], any strides (in elements).
  const void* logits;
  long long stride_t;
  long long stride_e;
  int T;
  int E;
  // Optional correction bias [E] (fp32, contiguous) or nullptr.
  const float* bias;
  // Number of valid rows T': a device scalar (int32/int64) or, when nullptr, ntnp_host.
  const void* ntnp;
  int ntnp_is64;
  long long ntnp_host;
  int scoring;      // 0 = softmax, 1 = sigmoid
  int num_groups;   // 0 = no grouped top-k
  int topk_group;
  int top_k;
  double cap_factor;  // capacity_factor * top_k / E, computed in double on the host
  long long min_tokens;  // hybrid: T' < min_tokens -> C = T' (exactly token choice)
  int renormalize;
  int apply_scale;
  float scale;
  int token_choice;  // 1 = skip the expert pick (plain fused token-choice top-k)
  // Implementation switches (results are identical; speed differs), see ec_ops.cpp:
  // bit 0: score kernel with one row group per warp; bit 1: warp-per-expert select for
  // T <= 256; bit 2: select with batched loads and a larger candidate buffer; bit 3: route
  // kernel finds the winning lane with one __reduce_min_sync instead of per-slot ballots.
  // bit 4: one launch for small T (ec_fused.cu: a thread-block cluster does score, select
  // and route with cluster barriers; falls back to the three launches where it does not
  // fit); bit 5: that cluster has 16 CTAs instead of 8; bit 6: three-launch path, short
  // columns (T <= 1024) selected by ec_warp_select.cuh; bit 7 (with bit 2): ec_select.cu's
  // FAST select (min/max pass, common key prefix skipped, no __match_any_sync); bit 8: the
  // single-launch kernel also writes keysT (only for tests' diagnostics).
  int variant;
  // Workspaces.
  uint32_t* keysT;          // [E, T] order keys of the pick score (0 = not eligible)
  unsigned long long* thr;  // [E] per-expert threshold on (key << 32 | ~t)
  // Outputs [T, top_k].
  float* out_w;
  int* out_ids;
};

// Launchers (ec_score.cu, ec_select.cu, ec_route.cu). `pow2` = next power of two >= E.
void launch_score(const Params& p, int kind, int pow2, cudaStream_t stream);
void launch_select(const Params& p, bool pdl, cudaStream_t stream);
void launch_route(const Params& p, int kind, int pow2, bool pdl, cudaStream_t stream);
// ec_fused.cu. Single launch (variant bit 4): returns false, launching nothing, where it does
// not apply (T > max_t, pre-Hopper device, shared memory or cluster too large).
bool launch_fused(const Params& p, int kind, int pow2, int max_t, cudaStream_t stream);
// Short-column select (variant bit 6): returns false, launching nothing, when T > 1024.
bool launch_select_short(const Params& p, bool pdl, cudaStream_t stream);

}  // namespace ec
