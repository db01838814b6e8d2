// PyTorch binding of the expert-choice routing kernels.
//
// ec_topk(...) -> [topk_weights fp32 [T, k], topk_ids int32 [T, k], keysT, thr]
// Argument checking that needs Python context (capacity factor, groups) is done by the
// Python wrapper (python/sglang_moe_routing/expert_choice/cuda.py); this layer checks
// what would otherwise be memory-unsafe.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

#include "ec_params.h"

namespace {

int scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ec::kFloat32;
    case at::kHalf: return ec::kFloat16;
    case at::kBFloat16: return ec::kBFloat16;
    default: TORCH_CHECK(false, "expert choice CUDA kernel: logits must be fp32/fp16/bf16, got ",
                         t.scalar_type());
  }
  return -1;
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// The value of environment variable `var`: `dflt` when unset or empty, else one of
// `allowed` written in decimal; anything else is an error naming the variable.
int env_choice(const char* var, std::initializer_list<int> allowed, int dflt) {
  const char* env = std::getenv(var);
  if (env == nullptr || *env == '\0') return dflt;
  const std::string v(env);
  std::string want;
  for (int a : allowed) {
    if (v == std::to_string(a)) return a;
    want += (want.empty() ? "" : ", ") + std::to_string(a);
  }
  TORCH_CHECK(false, "expert choice CUDA kernel: $", var, " must be unset or one of ", want,
              ", got '", v, "'");
  return dflt;
}

}  // namespace

std::vector<at::Tensor> ec_topk(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& num_valid, int64_t num_valid_host,
                                int64_t top_k, double cap_factor, bool renormalize,
                                int64_t scoring, int64_t num_groups, int64_t topk_group,
                                double scale, bool apply_scale, bool token_choice, bool pdl,
                                bool one_launch, int64_t min_tokens, bool write_keys,
                                bool stream_path) {
  TORCH_CHECK(logits.is_cuda(), "expert choice CUDA kernel: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "expert choice CUDA kernel: logits must be [T, E]");
  const int kind = scalar_kind(logits);
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= 512, "expert choice CUDA kernel: E must be in [1, 512], got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E && top_k <= 32,
              "expert choice CUDA kernel: top_k must be in [1, min(E, 32)], got ", top_k);
  TORCH_CHECK(T * E < (int64_t(1) << 31), "expert choice CUDA kernel: T * E must be < 2^31");
  TORCH_CHECK(scoring == 0 || scoring == 1, "expert choice CUDA kernel: bad scoring id");
  if (num_groups > 0) {
    TORCH_CHECK(E % num_groups == 0 && topk_group >= 1 && topk_group <= num_groups,
                "expert choice CUDA kernel: bad grouped top-k config");
  }
  // CTAs per expert in the select at T > 4096 (ec_select.cu): -1 = by E and T (unset), 0 = one,
  // 2 / 4 = a cluster of that many.
  ec::SelectOpts sel;
  sel.cluster = env_choice("SGLANG_MOE_EC_SELECT_CLUSTER", {0, 2, 4}, -1);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto opts = logits.options();
  at::Tensor out_w = at::empty({T, top_k}, opts.dtype(at::kFloat));
  at::Tensor out_ids = at::empty({T, top_k}, opts.dtype(at::kInt));
  // The streaming path (ec_stream.cu) needs no key matrix; keysT stays empty there.
  const bool no_keys = token_choice || (stream_path && T > 0);
  at::Tensor keys = at::empty({no_keys ? 0 : E, no_keys ? 0 : T}, opts.dtype(at::kInt));
  at::Tensor thr = at::empty({token_choice ? 0 : E}, opts.dtype(at::kLong));
  if (T == 0) return {out_w, out_ids, keys, thr};

  ec::Params p{};
  p.logits = logits.data_ptr();
  p.stride_t = logits.stride(0);
  p.stride_e = logits.stride(1);
  p.T = static_cast<int>(T);
  p.E = static_cast<int>(E);
  p.bias = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = bias.value();
    TORCH_CHECK(b.is_cuda() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == E &&
                    b.device() == logits.device(),
                "expert choice CUDA kernel: correction_bias must be a contiguous fp32 [E] tensor "
                "on the logits' device");
    p.bias = b.data_ptr<float>();
  }
  p.ntnp = nullptr;
  p.ntnp_is64 = 0;
  p.ntnp_host = num_valid_host;
  if (num_valid.has_value()) {
    const at::Tensor& n = num_valid.value();
    TORCH_CHECK(n.is_cuda() && n.device() == logits.device() && n.numel() == 1 &&
                    (n.scalar_type() == at::kInt || n.scalar_type() == at::kLong),
                "expert choice CUDA kernel: num_token_non_padded must be a 1-element int32/int64 "
                "tensor on the logits' device");
    p.ntnp = n.data_ptr();
    p.ntnp_is64 = n.scalar_type() == at::kLong ? 1 : 0;
  }
  p.scoring = static_cast<int>(scoring);
  p.num_groups = static_cast<int>(num_groups > 0 ? num_groups : 0);
  p.topk_group = static_cast<int>(topk_group);
  p.top_k = static_cast<int>(top_k);
  p.cap_factor = cap_factor;
  p.min_tokens = min_tokens;
  p.renormalize = renormalize ? 1 : 0;
  p.apply_scale = apply_scale ? 1 : 0;
  p.scale = static_cast<float>(scale);
  p.token_choice = token_choice ? 1 : 0;
  p.write_keys = write_keys ? 1 : 0;
  p.keysT = no_keys ? nullptr : reinterpret_cast<uint32_t*>(keys.data_ptr<int>());
  p.thr = token_choice ? nullptr : reinterpret_cast<unsigned long long*>(thr.data_ptr<int64_t>());
  p.out_w = out_w.data_ptr<float>();
  p.out_ids = out_ids.data_ptr<int>();

  const int pow2 = next_pow2(static_cast<int>(E));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  if (!token_choice && one_launch && ec::launch_fused(p, kind, pow2, stream)) {
    // Score, select and route in one thread-block-cluster launch (ec_fused.cu).
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out_w, out_ids, keys, thr};
  }
  if (!token_choice && stream_path) {
    // Histogram passes over the logits, no [E, T] matrix (ec_stream.cu), then the route.
    const int nb = ec::stream_bins(static_cast<int>(E), T);
    int capc = ec::kStreamCap;
    // Test hook: fewer candidate slots, to drive the overflow path on small inputs.
    if (const char* env = std::getenv("SGLANG_MOE_EC_STREAM_CAP")) {
      const int v = std::atoi(env);
      TORCH_CHECK(v >= 1 && v <= ec::kStreamCap, "expert choice CUDA kernel: "
                  "$SGLANG_MOE_EC_STREAM_CAP must be in [1, ", ec::kStreamCap, "], got '", env, "'");
      capc = v;
    }
    if (capc > T) capc = static_cast<int>(T);
    at::Tensor ws = at::zeros({E * nb + E + 1}, opts.dtype(at::kInt));
    at::Tensor st = at::empty({3 * E}, opts.dtype(at::kInt));
    at::Tensor cand = at::empty({E * capc}, opts.dtype(at::kLong));
    at::Tensor stats = at::empty({T, 4}, opts.dtype(at::kInt));
    ec::StreamWs w{};
    w.hist = reinterpret_cast<uint32_t*>(ws.data_ptr<int>());
    w.ncand = w.hist + E * nb;
    w.done = w.ncand + E;
    w.st_mode = st.data_ptr<int>();
    w.st_bin = w.st_mode + E;
    w.st_r = reinterpret_cast<uint32_t*>(w.st_mode + 2 * E);
    w.cand = reinterpret_cast<unsigned long long*>(cand.data_ptr<int64_t>());
    w.stats = reinterpret_cast<ec::RowStatPacked*>(stats.data_ptr<int>());
    w.nb = nb;
    int lg = 0;
    while ((1 << lg) < nb) ++lg;
    w.sh = 28 - lg;  // nb bins span 2^28 key units (32 binades)
    w.capc = capc;
    if (ec::launch_stream(p, w, kind, pow2, pdl, stream)) {
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ec::launch_route(p, kind, pow2, pdl, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return {out_w, out_ids, keys, thr};
    }
    // Not applicable on this device (shared memory): the three launches below.
    keys = at::empty({E, T}, opts.dtype(at::kInt));
    p.keysT = reinterpret_cast<uint32_t*>(keys.data_ptr<int>());
  }
  if (!token_choice) {
    ec::launch_score(p, kind, pow2, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ec::launch_select(p, pdl, stream, sel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  ec::launch_route(p, kind, pow2, pdl && !token_choice, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_w, out_ids, keys, thr};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sglang-moe-routing: fused expert-choice routing kernels";
  m.def("ec_topk", &ec_topk, "expert-choice top-k (score -> select -> route)",
        py::arg("logits"), py::arg("bias"), py::arg("num_valid"), py::arg("num_valid_host"),
        py::arg("top_k"), py::arg("cap_factor"), py::arg("renormalize"), py::arg("scoring"),
        py::arg("num_groups"), py::arg("topk_group"), py::arg("scale"), py::arg("apply_scale"),
        py::arg("token_choice"), py::arg("pdl"), py::arg("one_launch") = false,
        py::arg("min_tokens") = 0, py::arg("write_keys") = false, py::arg("stream") = false);
}
