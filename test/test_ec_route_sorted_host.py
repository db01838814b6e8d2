"""CPU checks of the per-lane sort of the sorted route rounds (``sgl-kernel/csrc/ec_device.cuh``;
used by ec_route.cu route_row_sorted and by ec_fused.cu for E > 32).

1. ``sort_desc`` (the compile-time comparator list ``net_pair`` and ``cmp_swap``, cut out of
   ec_device.cuh and compiled with the host C++ compiler) sorts descending for every ITER in
   2..16: all 0/1 inputs (the 0-1 principle: a sorting network) and random 64-bit inputs
   with repeated values and zeros.
2. A host model of the warp (32 lanes x ITER slots, expert e = it * 32 + lane): the order in
   which the sorted rounds (``sorted_composites`` + ``sorted_rounds``) take experts
   (per-lane descending composites ``picked << 63 | rkey << 31 | (0x7fffffff - e)``, a max
   over the lanes' heads, high word then low word) equals ``route_row``'s (picked experts by
   key, then the others, equal keys to the lower id), with ties, padding slots (e >= E),
   no / some / all experts picked, k up to 32. This models the rule, not the CUDA code (that is
   ``test_expert_choice_gpu.py::test_route_three_launch_bitwise_one_launch``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "sgl-kernel" / "csrc" / "ec_device.cuh"

_CPP = r"""
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>
SORT_DESC

template <int N> bool check_net() {
  for (int i = 0; i < net_pair(N, -1, 0); ++i) {
    const int a = net_pair(N, i, 0), b = net_pair(N, i, 1);
    if (!(0 <= a && a < b && b < N)) return false;
  }
  for (unsigned m = 0; m < (1u << N); ++m) {
    unsigned long long c[N];
    for (int i = 0; i < N; ++i) c[i] = (m >> i) & 1u;
    sort_desc(c);
    for (int i = 0; i + 1 < N; ++i) if (c[i] < c[i + 1]) return false;
  }
  std::mt19937_64 g(N);
  for (int r = 0; r < 5000; ++r) {
    unsigned long long c[N]; std::vector<unsigned long long> v(N);
    for (int i = 0; i < N; ++i) v[i] = c[i] = (g() % 4 == 0) ? 0 : (g() >> (g() % 64));
    sort_desc(c);
    std::sort(v.begin(), v.end(), std::greater<>());
    for (int i = 0; i < N; ++i) if (c[i] != v[i]) return false;
  }
  return true;
}

template <int ITER> bool check_order(std::mt19937_64& g, int E, int k, double ppick) {
  uint32_t rkey[32][ITER]; bool picked[32][ITER]; uint32_t pool[4];
  for (auto& v : pool) v = 0x00800000u + (uint32_t)(g() % 0xff000000ull);
  pool[0] = 0x00800000u; pool[1] = 0xff7fffffu;  // order keys of -FLT_MAX and FLT_MAX
  std::uniform_real_distribution<double> U(0, 1);
  for (int l = 0; l < 32; ++l) for (int it = 0; it < ITER; ++it) {
    const bool real = it * 32 + l < E;
    rkey[l][it] = !real ? 0u : (g() % 3 == 0 ? pool[g() % 4] : 0x00800000u + (uint32_t)(g() % 0xff000000ull));
    picked[l][it] = real && U(g) < ppick;
  }
  std::vector<int> a, b;
  // route_row (WS = 32)
  uint32_t cur[32][ITER]; bool fb = false;
  for (int l = 0; l < 32; ++l) for (int it = 0; it < ITER; ++it) cur[l][it] = picked[l][it] ? rkey[l][it] : 0u;
  auto wmax = [&] { uint32_t m = 0; for (auto& r : cur) for (uint32_t v : r) m = std::max(m, v); return m; };
  for (int j = 0; j < k; ++j) {
    uint32_t m = wmax();
    if (m == 0 && !fb) {
      fb = true;
      for (int l = 0; l < 32; ++l) for (int it = 0; it < ITER; ++it) cur[l][it] = picked[l][it] ? 0u : rkey[l][it];
      m = wmax();
    }
    uint32_t wid = 0xffffffffu;
    for (int l = 0; l < 32; ++l) for (int it = ITER - 1; it >= 0; --it) if (cur[l][it] == m) wid = std::min(wid, (uint32_t)(it * 32 + l));
    a.push_back((int)wid);
    cur[wid & 31][wid >> 5] = 0;
  }
  // route_row_sorted
  unsigned long long c[32][ITER];
  for (int l = 0; l < 32; ++l) {
    for (int it = 0; it < ITER; ++it) {
      const uint32_t e = it * 32 + l;
      const unsigned long long v = ((unsigned long long)picked[l][it] << 63) |
          ((unsigned long long)rkey[l][it] << 31) | (unsigned long long)(0x7fffffffu - e);
      c[l][it] = rkey[l][it] != 0u ? v : 0ull;
    }
    sort_desc(c[l]);
  }
  for (int j = 0; j < k; ++j) {
    uint32_t mh = 0, ml = 0;
    for (int l = 0; l < 32; ++l) mh = std::max(mh, (uint32_t)(c[l][0] >> 32));
    for (int l = 0; l < 32; ++l) ml = std::max(ml, (uint32_t)(c[l][0] >> 32) == mh ? (uint32_t)c[l][0] : 0u);
    const int win = (int)(0x7fffffffu - (ml & 0x7fffffffu));
    b.push_back(win);
    auto& h = c[win & 31];
    for (int i = 0; i + 1 < ITER; ++i) h[i] = h[i + 1];
    h[ITER - 1] = 0;
  }
  if (a != b) { printf("order differs: ITER=%d E=%d k=%d ppick=%g\n", ITER, E, k, ppick); return false; }
  return true;
}

template <int ITER> bool many_orders(std::mt19937_64& g) {
  const double pp[4] = {0.0, 0.05, 0.3, 1.0};
  for (int r = 0; r < 3000; ++r) {
    const int E = ITER * 32 - (int)(g() % (ITER > 2 ? 48 : 32));
    const int k = 1 + (int)(g() % std::min(32, E));
    if (!check_order<ITER>(g, E, k, pp[r % 4])) return false;
  }
  return true;
}

int main() {
  bool ok = check_net<2>() && check_net<3>() && check_net<4>() && check_net<5>() && check_net<6>() &&
            check_net<7>() && check_net<8>() && check_net<9>() && check_net<10>() && check_net<11>() &&
            check_net<12>() && check_net<13>() && check_net<14>() && check_net<15>() && check_net<16>();
  if (!ok) { printf("not a sorting network\n"); return 1; }
  std::mt19937_64 g(1);
  ok = many_orders<2>(g) && many_orders<4>(g) && many_orders<8>(g) && many_orders<12>(g) && many_orders<16>(g);
  printf(ok ? "ok\n" : "FAIL\n");
  return ok ? 0 : 1;
}
"""


def _sort_source() -> str:
    """ec_device.cuh from ``net_pair`` to the end of ``sort_desc``, as host code."""
    m = re.search(r"^constexpr int net_pair\(.*?^__device__ __forceinline__ void sort_desc\(.*?^}\n",
                  SRC.read_text(), re.S | re.M)
    assert m is not None, f"net_pair ... sort_desc not found in {SRC}"
    return m.group(0).replace("__device__ __forceinline__ ", "")


def test_route_sort_network_and_order(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("needs a host C++ compiler")
    src = tmp_path / "check.cpp"
    src.write_text(_CPP.replace("SORT_DESC", _sort_source()))
    exe = tmp_path / "check"
    subprocess.run([cxx, "-std=c++17", "-O2", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
