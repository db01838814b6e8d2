// Expert-choice routing kernels: host-visible parameter block and launcher declarations.
//
// Shared by the PyTorch binding (ec_ops.cpp, host compiler) and the CUDA sources.
// The semantics are those of python/sglang_moe_routing/expert_choice/reference.py.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ec {

enum ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kFusedMaxT = 1024;       // largest T the one-launch kernel takes (ec_fused.cu)
constexpr int kShortSelectMaxT = 256;  // select by one warp per expert up to this T

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
  int write_keys;  // the one-launch kernel also writes keysT (tests' diagnostics only)
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
// ec_fused.cu, one launch: returns false, launching nothing, where it does not apply
// (T > kFusedMaxT, pre-Hopper device, shared memory too large).
bool launch_fused(const Params& p, int kind, int pow2, cudaStream_t stream);

}  // namespace ec
