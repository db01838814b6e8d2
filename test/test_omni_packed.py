"""The packed bf16x2 forward VARIANTS of the Omni router (``omni/triton/forward_packed.py``):
packed MODE_ITER and lane-packed. Neither is the default; ``benchmark/omni_variants.py``
times them. Each must give MODE_ITER's output with the same chunk size bit for bit (same ids
in the same order, same weight bits; MODE_ITER is itself checked against the reference in
test_omni.py), and the reference's answer.

CPU: interpreted (TRITON_INTERPRET=1 from conftest.py; the s16x2 PTX is replaced by its
integer emulation there). With CUDA the same tests run compiled, with the PTX and with the
emulation; the ``gpu`` tests add the large shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_moe_routing.omni import omni_router_reference
from sglang_moe_routing.omni import triton as tk
from sglang_moe_routing.omni.triton import forward_packed as fp
from test_omni import DEV, check_routing, make_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import omni_variants  # noqa: E402
from harness import Checks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ASMS = (True, False) if DEV == "cuda" else (False,)


def iter_output(x, y, k, renorm=False, ids_dtype=torch.int64):
    """MODE_ITER with the chunk size both variants use (their bit-exact target)."""
    cfg = fp.packed_config(x.shape[1], k)
    return tk.omni_router_fwd_triton(x, y, k, renorm, ids_dtype, config=cfg)


def assert_bit_equal(w, ids, w2, ids2):
    bad_rows = (ids != ids2).any(1).nonzero().flatten()[:8].tolist()
    assert torch.equal(ids, ids2), f"ids differ in rows {bad_rows}"
    bits = torch.int16 if w.element_size() == 2 else torch.int32
    assert torch.equal(w.view(bits), w2.view(bits)), "weights differ"


def run_packed(x, y, k, renorm=False, ids_dtype=torch.int64, asm=True, block_t=4):
    T = x.shape[0]
    w = torch.full((T, k), float("nan"), device=x.device, dtype=x.dtype)
    ids = torch.full((T, k), -1, device=x.device, dtype=ids_dtype)
    ran = fp.launch_fwd_packed(x, y, k, renorm, w, ids, fp.packed_config(x.shape[1], k, block_t=block_t),
                               asm=asm)
    return w, ids, ran


def run_lanepk(x, y, k, renorm=False, ids_dtype=torch.int64, asm=True, block_t=2, num_warps=1, path=0):
    T = x.shape[0]
    w = torch.full((T, k), float("nan"), device=x.device, dtype=x.dtype)
    ids = torch.full((T, k), -1, device=x.device, dtype=ids_dtype)
    ran = fp.launch_fwd_lanepk(x, y, k, renorm, w, ids, fp.lanepk_config(x.shape[1], k, block_t, num_warps),
                               asm=asm, path=path)
    return w, ids, ran


CASES = [
    # (T, n, k, dtype, packed kernel runs)
    (5, 128, 8, torch.bfloat16, True),
    (3, 512, 8, torch.bfloat16, True),
    (2, 1024, 8, torch.bfloat16, True),  # 64 columns per lane: int64 column bitmasks
    (4, 200, 8, torch.float16, True),  # n < NP: masked words and lanes
    (3, 130, 3, torch.bfloat16, True),  # k not a power of two
    (3, 256, 16, torch.float16, True),  # K = 16: packed MODE_ITER only (lists of 4 per lane)
    (2, 96, 1, torch.bfloat16, True),  # n < 128
    (3, 128, 8, torch.float32, False),  # fp32: MODE_ITER itself
    (3, 129, 8, torch.bfloat16, False),  # odd n: MODE_ITER itself
]


@pytest.mark.parametrize("T,n,k,dtype,packs", CASES)
def test_packed_iter_bit_exact(T, n, k, dtype, packs):
    x, y = make_logits(T, n, dtype, device=DEV, seed=T * n + k)
    rids = omni_router_reference(x, y, k)[1]
    for renorm in (False, True):
        w2, ids2 = iter_output(x, y, k, renorm)
        for asm in ASMS:
            w, ids, ran = run_packed(x, y, k, renorm, asm=asm)
            assert ran == packs
            assert_bit_equal(w, ids, w2, ids2)
            check_routing(x, y, k, w, ids, renormalize=renorm, ref_ids=rids)


@pytest.mark.parametrize("T,n,k,dtype,packs", CASES)
def test_lanepk_bit_exact(T, n, k, dtype, packs):
    """Every path of the lane-packed kernel (auto; main only, which is right on rows that
    need no fallback, as random rows here; fallback only) and 1 or 2 tokens per warp."""
    x, y = make_logits(T, n, dtype, device=DEV, seed=T * n + k + 1)
    rids = omni_router_reference(x, y, k)[1]
    lane = packs and fp.lanepk_fits(n, k)
    w2, ids2 = iter_output(x, y, k)
    for asm in ASMS:
        for block_t, path in ((2, 0), (1, 0), (2, 1), (2, 2)):
            w, ids, ran = run_lanepk(x, y, k, asm=asm, block_t=block_t, path=path)
            assert ran == lane
            assert_bit_equal(w, ids, w2, ids2)
            check_routing(x, y, k, w, ids, ref_ids=rids)
    w, ids, _ = run_lanepk(x, y, k, True, torch.int32, block_t=4, num_warps=2)
    w2, ids2 = iter_output(x, y, k, True, torch.int32)
    assert ids.dtype == torch.int32
    assert_bit_equal(w, ids, w2, ids2)


def adversarial(dtype, T=13, n=128):
    """Rows that the lane-packed main path cannot serve (the fallback must run) and NaN /
    inf rows. Lane ``r`` owns columns ``[8r, 8r + 8)`` at n = 128."""
    x, y = make_logits(T, n, dtype, device=DEV, seed=5)
    x[0, 16:24] = 10.0 + 0.0625 * torch.arange(8, dtype=dtype, device=DEV)  # a lane holds x top 8
    y[0, 5] = 20.0  # ... and the top 8 experts are (x's top 8, this y)
    x[1, 40] = x[1, 45] = 9.0  # a value twice in one lane, both popped: second column
    x[11, 50] = x[11, 52] = x[11, 55] = 9.0  # three times: the fallback
    y[1, 3] = 9.0
    x[2, 8] = x[2, 20] = x[2, 100] = 7.0  # ties across lanes: lane (= column) order
    x[3, 7] = float("nan")
    y[4, 100] = -float("nan")
    y[5].view(torch.int16)[77] = -1  # 0xFFFF: the NaN whose flipped halves equal the pad
    x[6, :120] = float("-inf")  # only 8 finite x
    y[7, 3] = float("inf")
    x[8, :] = -0.0  # every score ties
    x[9, 64:72] = 0.0
    x[9, 64] = -0.0  # -0.0 and +0.0 in one lane: +0.0 ranks first (key order)
    x[10, 0:8] = 3.0  # eight equal values in one lane
    return x, y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_variants_adversarial_rows(dtype):
    """Ties, dry lanes, NaN (including 0xFFFF), +-inf, signed zeros: both variants equal
    MODE_ITER bit for bit on every row (NaN rows included), and the fallback is needed:
    the lane-packed main path alone gets rows 0, 10 and 11 wrong."""
    k = 8
    x, y = adversarial(dtype)
    w2, ids2 = iter_output(x, y, k)
    for asm in ASMS:
        w, ids, ran = run_packed(x, y, k, asm=asm)
        assert ran
        assert_bit_equal(w, ids, w2, ids2)
        for block_t in (1, 2):
            w, ids, ran = run_lanepk(x, y, k, asm=asm, block_t=block_t)
            assert ran
            assert_bit_equal(w, ids, w2, ids2)
    # programs of one token: the main path (no fallback) is wrong exactly where it must be
    _, ids1, _ = run_lanepk(x, y, k, block_t=1, path=1)
    wrong = (ids1 != ids2).any(1).nonzero().flatten().tolist()
    assert {0, 10, 11} <= set(wrong), wrong
    assert not set(wrong) & {1, 2, 3, 4, 7, 9}, wrong
    ok = [r for r in range(x.shape[0]) if r not in (3, 4, 5, 7)]
    check_routing(x[ok], y[ok], k, w2[ok], ids2[ok], ref_ids=omni_router_reference(x[ok], y[ok], k)[1])
    for r in (3, 4, 5):
        assert bool(torch.isnan(w2[r]).all()) and ids2[r].unique().numel() == k


def test_strided_and_reversed_inputs():
    """Column slices of one [T, 2n + 2] tensor (y before x too): packable, same answer."""
    T, n, k = 5, 128, 8
    logits = torch.randn(T, 2 * n + 2, device=DEV).to(torch.bfloat16)
    for x, y in ((logits[:, :n], logits[:, n + 2:]), (logits[:, n + 2:], logits[:, :n])):
        assert fp.packable(x, y)
        w2, ids2 = iter_output(x, y, k)
        w, ids, ran = run_lanepk(x, y, k)
        assert ran
        assert_bit_equal(w, ids, w2, ids2)
        w, ids, ran = run_packed(x, y, k)
        assert ran
        assert_bit_equal(w, ids, w2, ids2)
    odd = logits[:, 1:n + 1]  # 2-byte aligned only: MODE_ITER itself
    assert not fp.packable(odd, logits[:, n + 2:])


def test_bad_config_and_entry_point():
    x, y = make_logits(3, 128, torch.bfloat16, device=DEV)
    w = torch.empty(3, 8, device=DEV, dtype=x.dtype)
    ids = torch.empty(3, 8, device=DEV, dtype=torch.int64)
    with pytest.raises(ValueError, match="launch_fwd_lanepk: cfg must come from lanepk_config"):
        fp.launch_fwd_lanepk(x, y, 8, False, w, ids, fp.packed_config(128, 8))
    w, ids = fp.omni_router_fwd_packed(x, y, 8)
    assert_bit_equal(w, ids, *iter_output(x, y, 8))
    w0, ids0 = fp.omni_router_fwd_packed(x[:0], y[:0], 8)
    assert w0.shape == (0, 8) and ids0.shape == (0, 8)


def test_s16x2_emulation_matches_numpy():
    """The interpreter's stand-in for max.s16x2 / min.s16x2: per-half signed max / min."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(a_ptr + i)
        b = tl.load(b_ptr + i)
        tl.store(o_ptr + i, fp._s16x2_max_emu(a, b))
        tl.store(o_ptr + N + i, fp._s16x2_min_emu(a, b))

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2**31, 2**31 - 1, (256,), generator=g, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-2**31, 2**31 - 1, (256,), generator=g, dtype=torch.int64).to(torch.int32)
    a[:4] = torch.tensor([-2147450880, 0x7FFF7FFF, -1, 0], dtype=torch.int32)
    out = torch.empty(512, dtype=torch.int32)
    if DEV == "cuda":
        a, b, out = a.cuda(), b.cuda(), out.cuda()
    _k[(1,)](a, b, out, N=256)
    an = a.cpu().numpy().view(np.int16).reshape(-1, 2)
    bn = b.cpu().numpy().view(np.int16).reshape(-1, 2)
    want = np.concatenate([np.maximum(an, bn).reshape(-1).view(np.int32),
                           np.minimum(an, bn).reshape(-1).view(np.int32)])
    assert np.array_equal(out.cpu().numpy(), want)


def test_bench_rows_checked_and_refused():
    """The benchmark's packed rows (bench_omni.py --packed) launch what they name and pass
    both checks; an output in another order than MODE_ITER's passes the reference check
    but not the bit-exact one, and the row's ratio is then refused."""
    n, k, T = 128, 8, 4
    rows = omni_variants._variant_configs(n, k, T, torch.device(DEV), packed_only=True)
    names = [r[0] for r in rows]
    assert names[0].startswith("default") and len(rows) == 3, names  # spot: one of each
    assert "packed-iter" in names[1] and "lane-packed" in names[2]
    x, y = make_logits(T, n, torch.bfloat16, device=DEV, seed=3)
    checks = Checks()
    for name, cfg, stage in rows[1:]:
        assert omni_variants.is_full(stage)
        w = torch.full((T, k), float("nan"), device=DEV, dtype=x.dtype)
        ids = torch.full((T, k), -1, device=DEV, dtype=torch.int64)
        omni_variants._launch_variant(cfg, stage, k)(x, y, w, ids)
        checks.run((name, n, k, T), lambda: omni_variants.check_forward(x, y, k, w, ids)
                   or omni_variants.check_same_as_iter(cfg, stage, x, y, k, w, ids))
    assert not checks.failures, checks.failures
    swapped = ids.clone()
    swapped[0, [1, 2]] = ids[0, [2, 1]]
    cfg, stage = rows[2][1], rows[2][2]
    key = ("swapped", n, k, T)
    checks.run(key, lambda: omni_variants.check_forward(x, y, k, w, swapped)
               or omni_variants.check_same_as_iter(cfg, stage, x, y, k, w, swapped))
    assert omni_variants.check_forward(x, y, k, w, swapped) is None
    assert checks.failures[key] == "ids differ from MODE_ITER's in 1 rows"
    assert checks.ratio(1.0, 2.0, key).startswith("n/a (correctness check failed: swapped")
    assert rows == omni_variants._variant_configs(n, k, T, torch.device(DEV), packed_only=True)
    goal = omni_variants._variant_configs(512, 8, 4096, torch.device(DEV), packed_only=True)
    assert len(goal) == 1 + len(omni_variants.PACKED_VARIANTS) + len(omni_variants.LANEPK_VARIANTS)


# ----------------------------------------------------------------------------- GPU, large shapes

# The goal shape with every launch shape benchmark/omni_variants.py times (PACKED_VARIANTS,
# LANEPK_VARIANTS), PTX and emulated, both 16-bit dtypes; spot checks elsewhere (bf16, PTX,
# the default launch shapes), so the GPU run stays within a few minutes of compiling.
GPU_CASES = [(512, 8, dt, True) for dt in (torch.bfloat16, torch.float16)] + [
    (n, k, torch.bfloat16, False) for n, k in ((64, 8), (128, 8), (256, 8), (1024, 8), (1000, 5),
                                               (512, 1), (512, 2), (512, 32))]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,dtype,full", GPU_CASES)
def test_gpu_variants_bit_exact_large(n, k, dtype, full):
    """T = 4096 (the goal's batch) and 7: both variants against MODE_ITER bit for bit and
    the reference's scores."""
    from test_omni_gpu import reference_ids_chunked

    packed = sorted({(bt, nw) for bt, nw, _ in omni_variants.PACKED_VARIANTS}) if full else [(2, 1)]
    lanes = sorted({(bt, nw) for bt, nw, _ in omni_variants.LANEPK_VARIANTS}) if full else [(2, 1)]
    for T in (4096, 7):
        x, y = make_logits(T, n, dtype, device="cuda", seed=n * 7 + k + T)
        w2, ids2 = iter_output(x, y, k)
        check_routing(x, y, k, w2, ids2, ref_ids=reference_ids_chunked(x, y, k))
        for asm in (True, False) if full else (True,):
            for bt, nw in packed:
                w = torch.full_like(w2, float("nan"))
                ids = torch.full_like(ids2, -1)
                assert fp.launch_fwd_packed(x, y, k, False, w, ids,
                                            fp.packed_config(n, k, block_t=bt, num_warps=nw), asm=asm)
                assert_bit_equal(w, ids, w2, ids2)
            for bt, nw in lanes:
                w, ids, ran = run_lanepk(x, y, k, asm=asm, block_t=bt, num_warps=nw)
                assert ran == fp.lanepk_fits(n, k)
                assert_bit_equal(w, ids, w2, ids2)


@pytest.mark.gpu
def test_gpu_variants_many_ties():
    """Logits on a coarse grid (many equal values per row and lane, many fallbacks)."""
    T, n, k = 4096, 512, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randint(-8, 8, (T, n), device="cuda", generator=g) * 0.25).to(torch.bfloat16)
    y = (torch.randint(-8, 8, (T, n), device="cuda", generator=g) * 0.25).to(torch.bfloat16)
    w2, ids2 = iter_output(x, y, k)
    for asm in (True, False):
        assert_bit_equal(*run_packed(x, y, k, asm=asm)[:2], w2, ids2)
        assert_bit_equal(*run_lanepk(x, y, k, asm=asm)[:2], w2, ids2)
