"""The MODE_LANE forward kernel of the Omni router (``omni/triton/forward_lane.py``) against
the reference. CPU: interpreted (TRITON_INTERPRET=1 from conftest.py); with CUDA: compiled.
Helpers come from ``test_omni.py``.
"""

from __future__ import annotations

import pytest
import torch

from sglang_moe_routing.omni import omni_router_reference
from sglang_moe_routing.omni import triton as tk
from test_omni import DEV, check_routing, make_logits, tiny_config_fwd

# numpy warns about NaN arithmetic in masked (padding) lanes of interpreted kernels
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

LANE_CASES = [
    # (T, n, k, dtype): lanes of 16 columns-per-vector layouts, packed and plain keys
    (9, 128, 8, torch.float32),
    (7, 200, 8, torch.bfloat16),  # n < NP: column masks, packed pairs
    (5, 256, 7, torch.float16),
    (6, 130, 3, torch.float32),
    (5, 64, 8, torch.bfloat16),  # 4 columns per lane
    (4, 31, 4, torch.bfloat16),  # odd n: plain (unpacked) 16-bit keys
    (3, 512, 8, torch.bfloat16),
    (2, 33, 1, torch.float32),
]


@pytest.mark.parametrize("T,n,k,dtype", LANE_CASES)
def test_triton_lane_variant_matches_reference(T, n, k, dtype):
    """MODE_LANE with lists of 4, 2 and 1 keys per lane (1: the lists run dry at once, so
    every row takes the exact fallback): the reference's answer, poisoned outputs."""
    x, y = make_logits(T, n, dtype, device=DEV, seed=T * n + k)
    rids = omni_router_reference(x, y, k)[1]
    for lists in (4, 2, 1):
        cfg = tk.fwd_config_lane(n, k, T, x.device, lists=lists)
        assert cfg.mode == tk.MODE_LANE
        for renorm in (False, True) if lists == 4 else (False,):
            w = torch.full((T, k), float("nan"), device=DEV, dtype=dtype)
            ids = torch.full((T, k), -1, device=DEV, dtype=torch.int64)
            tk._launch_fwd(x, y, k, renorm, w, ids, cfg)
            check_routing(x, y, k, w, ids, renormalize=renorm, ref_ids=rids)


def test_triton_lane_exhaustion_nan_inf():
    """Adversarial rows: the top 8 of x (and y) in one lane's 8 columns, so the lane's
    4-entry list runs dry: the program must take the exact fallback. Rows with +NaN,
    -NaN (all weights NaN, distinct ids in range), -inf and +inf logits; every other row
    without ties equals MODE_ITER's ids."""
    T, n, k = 9, 128, 8
    for dtype in (torch.bfloat16, torch.float32):
        x, y = make_logits(T, n, dtype, device=DEV, seed=21)
        x[0, 16:24] = 10.0 + torch.arange(8, dtype=dtype)
        y[0, 40:48] = 5.0 + torch.arange(8, dtype=dtype)
        x[2, 0:8] = 3.0 + torch.arange(8, dtype=dtype) * 0.125
        x[4, 7] = float("nan")
        y[5, 100] = -float("nan")
        x[6, :120] = float("-inf")  # only 8 finite x: the top-8 of x are those
        y[7, 3] = float("inf")
        x[8, :] = -0.0
        cfg = tk.fwd_config_lane(n, k, T, x.device)
        w, ids = tk.omni_router_fwd_triton(x, y, k, False, torch.int64, config=cfg)
        nanrows = [4, 5]
        keep = [r for r in range(T) if r not in nanrows + [7]]
        check_routing(x[keep], y[keep], k, w[keep], ids[keep],
                      ref_ids=omni_router_reference(x[keep], y[keep], k)[1])
        for r in nanrows:
            assert bool(torch.isnan(w[r]).all()) and ids[r].unique().numel() == k
            assert bool(((ids[r] >= 0) & (ids[r] < n * n)).all())
        assert bool(((ids // n)[0] >= 16).all() and ((ids // n)[0] < 24).all())
        assert bool(((ids // n)[6] >= 120).all())
        assert bool(((ids % n)[7] == 3).all())  # +inf y: every chosen expert has j = 3
        rw7, rids7 = omni_router_reference(x[7:8], y[7:8], k)
        assert torch.equal(torch.isnan(w[7]), torch.isnan(rw7[0]))
        _, dids = tk.omni_router_fwd_triton(x, y, k, False, torch.int64,
                                            config=tiny_config_fwd(tk.MODE_ITER, chunk=16))
        same = keep[:-1]  # row 8 ties everywhere (-0.0): any k distinct experts
        assert torch.equal(ids[same].sort(1).values, dids[same].sort(1).values)


def test_triton_lane_unpacked_and_reversed_layouts():
    """16-bit logits that cannot go as int32 pairs (y at an odd element offset) and y
    stored before x (negative offset between the two): same answer; int32 ids too."""
    T, n, k = 5, 130, 8
    logits = torch.randn(T, 2 * n + 1, device=DEV).to(torch.bfloat16)
    for x, y in ((logits[:, :n], logits[:, n + 1:]), (logits[:, n + 1:], logits[:, :n])):
        rids = omni_router_reference(x, y, k)[1]
        cfg = tk.fwd_config_lane(n, k, T, x.device)
        w, ids = tk.omni_router_fwd_triton(x, y, k, True, torch.int32, config=cfg)
        assert ids.dtype == torch.int32
        check_routing(x, y, k, w, ids, renormalize=True, ref_ids=rids)


def test_lane_is_an_autotune_candidate_for_small_k():
    cpu = torch.device("cpu")
    assert tk.fwd_config(512, 8, 4096, cpu).mode == tk.MODE_ITER
    assert any(c.mode == tk.MODE_LANE for c in tk.fwd_config_candidates(512, 8, 4096, cpu))
    assert any(c.mode == tk.MODE_LANE for c in tk.fwd_config_candidates(128, 3, 4096, cpu))
    assert not any(c.mode == tk.MODE_LANE for c in tk.fwd_config_candidates(512, 16, 4096, cpu))
    assert tk.fwd_config(64, 8, 4096, cpu).mode == tk.MODE_DENSE
