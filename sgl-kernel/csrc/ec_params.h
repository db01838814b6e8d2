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

// Large-T path without the [E, T] key matrix (ec_stream.cu). Per-expert histograms of the
// pick keys over `nb` value bins (pass 1), the threshold bin per expert, the bin's composites
// (key << 32 | ~t) collected into `cand` (pass 2, at most `capc` per expert), the exact
// threshold among them (or, when the bin holds more than `capc` tokens, by radix passes
// that recompute the expert's keys from the logits); then the usual route kernel.
constexpr int kStreamCap = 4096;  // candidates kept per expert (default)

// Bins per expert (nb bins span the 32 binades above 2^-30): at most ~132 KB of shared memory
// per CTA in pass 1 (E * (nb + 2) * 4 bytes). Fewer bins cost fewer flush atomics (one per
// non-zero bin pair and CTA), more bins fewer candidates (the threshold bin's tokens). With
// randn logits (std 0.5-2, bf16, CPU count) the threshold's binade holds <= 39% of T at E = 8,
// <= 36% at E = 64 / 128, <= 14% at E >= 256: bins per binade grow with T so that the bin
// stays well under the 4096 candidate slots at these E.
inline int stream_bins(int E, long long T) {
  if (E <= 32) return 256;
  int nb = 256;
  while (nb > 32 && static_cast<long long>(E) * nb > 32768) nb >>= 1;
  int by_t = T < 16384 ? 32 : (T < 32768 ? 64 : (T < 65536 ? 128 : 256));
  if (E <= 64 && by_t < 256) by_t *= 2;
  return nb < by_t ? nb : by_t;
}

struct RowStatPacked {
  float m, sum;
  uint32_t gmask, pad;
};

struct StreamWs {
  uint32_t* hist;            // [E * nb], zero on entry
  uint32_t* ncand;           // [E], zero on entry
  uint32_t* done;            // [1], zero on entry: pass-1 CTAs finished
  int* st_mode;              // [E]: 0 = thr written, 1 = select among cand, 2 = overflow
  int* st_bin;               // [E] threshold bin
  uint32_t* st_r;            // [E] rank (1-based) of the threshold inside its bin
  unsigned long long* cand;  // [E * capc]
  RowStatPacked* stats;      // [T] per-row max, sum, kept-group mask (pass 1 writes them)
  int nb;                    // bins per expert (stream_bins)
  int sh;                    // key bits per bin (bins cover 32 binades from 2^-30)
  int capc;                  // candidate slots per expert
};

// Launchers (ec_score.cu, ec_select.cu, ec_route.cu). `pow2` = next power of two >= E.
void launch_score(const Params& p, int kind, int pow2, cudaStream_t stream);
// Select options (parsed in ec_ops.cpp from the environment; ec_select.cu explains).
// cluster: CTAs per expert at T > 4096 on sm_90+ ($SGLANG_MOE_EC_SELECT_CLUSTER): -1 = chosen
// by E and T, 0 = one, 2 / 4 = a cluster of that many.
struct SelectOpts {
  int cluster = -1;
};
void launch_select(const Params& p, bool pdl, cudaStream_t stream, SelectOpts opts = {});
void launch_route(const Params& p, int kind, int pow2, bool pdl, cudaStream_t stream);
// The current device's compute-capability major, shared-memory opt-in limit per block and
// SM count, read once per device (host-side queries only, capture-safe; ec_fused.cu).
struct DeviceInfo {
  int major = 0;
  int smem_optin = 0;
  int sms = 0;
};
DeviceInfo device_info();
// ec_fused.cu, one launch: returns false, launching nothing, where it does not apply
// (T > kFusedMaxT, pre-Hopper device, shared memory too large).
bool launch_fused(const Params& p, int kind, int pow2, cudaStream_t stream);
// ec_stream.cu: the three kernels before the route kernel (which the caller launches next);
// returns false, launching nothing, where it does not apply (shared memory too small).
bool launch_stream(const Params& p, const StreamWs& w, int kind, int pow2, bool pdl,
                   cudaStream_t stream);

}  // namespace ec
