"""Batch invariance of each routing mode (issue 11, item 3 and goal 2), for
``benchmark/eval_routing_quality.py``: how much a fixed prompt's log-probabilities and routing
change when its batch mates change, and the same measurement again inside SGLang's
batch-invariant ops (``--batch-invariant-ops``).

``batch_invariance``: for a few fixed prompts, ``n_trials`` batches that each hold the prompt
(row 0) and random other held-out sequences as batch mates (full prefill): max and mean
``|delta logprob|`` of the prompt's next-token log-probabilities against the first batch, and
the share of the prompt's (layer, token) expert sets that changed.

``batch_invariant_ops_run`` / ``run_invariance_bi``: SGLang's
``sglang.srt.batch_invariant_ops.set_batch_invariant_mode(True)`` (what
``--enable-deterministic-inference`` uses: aten mm/addmm/bmm/_log_softmax/mean.dim/rms_norm on
the CUDA key replaced by persistent Triton kernels, or DeepGEMM's deterministic bf16 GEMM where
SGLang enables it), with the model's experts switched to ``eager`` (one ``F.linear`` per expert,
i.e. aten mm; ``torch._grouped_mm`` is not replaced) and ONE sdpa backend forced (the first of
flash, efficient, math that runs the model), all restored afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_modes import (  # noqa: E402
    Mode,
    RoutingState,
    SglangTopK,
    forward_logprobs,
    mode_path,
    patch_routers,
)


def print_invariance(tag: str, rows: Sequence[Dict]) -> None:
    for r in rows:
        print(f"[eval] {tag} {r['mode']:<22} max |dlogprob| {r['max_abs_dlogprob']:.3e} "
              f"mean {r['mean_abs_dlogprob']:.3e} routing changed {r['routing_changed']:.2%}",
              flush=True)


@torch.no_grad()
def batch_invariance(model, modes: Sequence[Mode], seqs: np.ndarray, n_prompts: int,
                     n_trials: int, batch: int, device, backend: str, seed: int,
                     biases: Optional[Dict[int, torch.Tensor]] = None,
                     deadline: float = float("inf"), sglang: Optional[SglangTopK] = None
                     ) -> List[Dict]:
    """Per mode: max / mean |delta logprob| of fixed prompts' tokens across random batch mates,
    and the share of the prompt's (layer, token) expert sets that differ from the first
    batch's (``routing_changed``)."""
    rng = np.random.default_rng(seed)
    n = len(seqs)
    prompt_idx = np.linspace(0, n - 1, num=n_prompts).astype(np.int64)
    plans = []
    for p in prompt_idx:
        others = np.array([i for i in range(n) if i != p])
        plans.append([(p, rng.choice(others, size=batch - 1, replace=len(others) < batch - 1))
                      for _ in range(n_trials)])
    out = []
    for mode in modes:
        if time.time() > deadline:
            print(f"[eval] time cap: invariance {mode.name} skipped", flush=True)
            continue
        state = RoutingState(mode, backend, biases, sglang=sglang)
        state.record = False
        state.capture_rows = seqs.shape[1]  # the prompt is row 0: its tokens come first
        deltas_max, deltas_sum, deltas_cnt = 0.0, 0.0, 0
        changed, compared = 0, 0
        with patch_routers(model, state):
            for plan in plans:
                ref = ref_ids = None
                for p, mates in plan:
                    x = torch.from_numpy(
                        np.concatenate([seqs[p:p + 1], seqs[mates]]).astype(np.int64)).to(device)
                    state.captured = []
                    lp, _ = forward_logprobs(model, x, x.shape[1])
                    lp, ids = lp[0], torch.stack(state.captured)  # [layers, L, k]
                    if ref is None:
                        ref, ref_ids = lp, ids
                        continue
                    d = (lp - ref).abs()
                    deltas_max = max(deltas_max, d.max().item())
                    deltas_sum += d.sum().item()
                    deltas_cnt += d.numel()
                    changed += (ids != ref_ids).any(-1).sum().item()
                    compared += ids.shape[0] * ids.shape[1]
        out.append(dict(mode=mode.name, router_path=mode_path(mode, sglang),
                        prompts=int(n_prompts), trials=int(n_trials),
                        batch_seqs=int(batch), T=int(batch * seqs.shape[1]),
                        max_abs_dlogprob=deltas_max,
                        mean_abs_dlogprob=deltas_sum / max(deltas_cnt, 1),
                        bitwise_identical=deltas_max == 0.0,
                        routing_changed=changed / max(compared, 1)))
    return out


BI_MODES = ("tc", "thr", "ec1.25")  # the modes measured again under --batch-invariant-ops
BI_OPS = "sglang batch-invariant"


def load_batch_invariant_ops(device: torch.device):
    """SGLang's ``set_batch_invariant_mode`` for ``--batch-invariant-ops``; one-line
    ``SystemExit`` off CUDA (its kernels are Triton on the CUDA dispatch key) or without
    sglang."""
    if device.type != "cuda":
        raise SystemExit(f"error: --batch-invariant-ops needs a CUDA device (SGLang's "
                         f"batch-invariant ops are Triton kernels on the CUDA dispatch key); "
                         f"the eval runs on {device}")
    try:
        from sglang.srt.batch_invariant_ops import set_batch_invariant_mode
    except Exception as exc:  # noqa: BLE001 - ImportError or whatever sglang raises on import
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise SystemExit(f"error: --batch-invariant-ops: sglang.srt.batch_invariant_ops is not "
                         f"importable ({msg})") from None
    return set_batch_invariant_mode


def _bi_mm_kernel() -> str:
    """Which GEMM SGLang's batch-invariant mm takes for bf16 (read from its module)."""
    bio = sys.modules.get("sglang.srt.batch_invariant_ops.batch_invariant_ops")
    if bio is None:
        return "unknown"
    deepgemm = bool(getattr(bio, "_ENABLE_MM_DEEPGEMM", False)
                    and getattr(bio, "ENABLE_JIT_DEEPGEMM", False))
    return ("DeepGEMM deterministic bf16 GEMM where aligned, else Triton persistent matmul"
            if deepgemm else "Triton persistent matmul")


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _sdpa_ctx(backend: Optional[str]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()


@contextlib.contextmanager
def batch_invariant_ops_run(model, set_mode, probe: torch.Tensor):
    """Inside: SGLang's batch-invariant ops (``set_mode(True)``), the model's experts
    ``eager``, and one sdpa backend (the first of :data:`SDPA_BACKENDS` that runs the model on
    ``probe``; the others are disabled). Yields the settings for the rows. Afterwards the
    experts implementation and ``torch.bmm`` come back (SGLang's context manager leaves
    ``torch.bmm`` patched on exit, and skips its own clean-up when the body raises: the body's
    error is re-raised only after it has exited normally)."""
    impl = model.config._experts_implementation
    bmm = torch.bmm
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    model.set_experts_implementation("eager")
    error: Optional[BaseException] = None
    try:
        with set_mode(True):
            try:
                backend, errors = None, []
                for name in SDPA_BACKENDS if attn == "sdpa" else (None,):
                    try:
                        with _sdpa_ctx(name):
                            forward_logprobs(model, probe, probe.shape[1])
                    except RuntimeError as exc:
                        errors.append(f"{name}: {' '.join(str(exc).split())[:120]}")
                        continue
                    backend = name
                    break
                else:
                    raise RuntimeError(f"no sdpa backend runs the model ({'; '.join(errors)})")
                dtype = str(next(model.parameters()).dtype).replace("torch.", "")
                if probe.device.type == "cuda":  # forward_logprobs' autocast
                    dtype = f"{dtype} weights, bf16 autocast"
                with _sdpa_ctx(backend):
                    yield dict(ops=BI_OPS, experts="eager", dtype=dtype,
                               attention=f"sdpa {backend} only" if backend else attn,
                               mm_kernel=_bi_mm_kernel())
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside set_mode
                error = exc
        if error is not None:
            raise error
    finally:
        torch.bmm = bmm
        model.set_experts_implementation(impl)


def invariance_plan(args: argparse.Namespace) -> Tuple[int, int, int]:
    """``(prompts, trials, batch sequences)`` of both invariance passes: ``--inv-prompts``
    (default 4, ``--tiny`` 2), ``--inv-trials``, ``--inv-batch`` (default 8)."""
    return args.inv_prompts or (2 if args.tiny else 4), args.inv_trials, args.inv_batch or 8


def run_invariance_bi(result: Dict, model, set_mode, modes: Sequence[Mode], seqs: np.ndarray,
                      args: argparse.Namespace, device, biases, deadline: float,
                      sglang: Optional[SglangTopK]) -> None:
    """The ``--batch-invariant-ops`` stage: :func:`batch_invariance` for ``modes`` inside
    :func:`batch_invariant_ops_run`; rows (with its settings) to ``result["invariance_bi"]``,
    modes left out (time cap, failure) to ``result["skipped"]`` as ``invariance_bi/<mode>``."""
    rows, why = [], ""
    if time.time() > deadline:
        print("[eval] time cap: invariance(bi-ops) skipped", flush=True)
    else:
        prompts, trials, batch = invariance_plan(args)
        probe = torch.from_numpy(seqs[:batch].astype(np.int64)).to(device)
        try:
            with batch_invariant_ops_run(model, set_mode, probe) as settings:
                rows = batch_invariance(
                    model, modes, seqs, prompts, trials, batch, device, args.backend, args.seed,
                    biases, deadline, sglang)
            for r in rows:
                r.update(settings)
        except Exception as exc:  # noqa: BLE001 - the later stages still run
            why = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            print(f"[eval] invariance(bi-ops) failed{why}", flush=True)
            rows = []
    result["invariance_bi"] = rows
    result["skipped"] += [f"invariance_bi/{m.name}{why}" for m in modes
                          if m.name not in {r["mode"] for r in rows}]
    print_invariance("invariance(bi-ops)", rows)
    if rows:
        print(f"[eval] invariance(bi-ops) settings: experts {rows[0]['experts']}, attention "
              f"{rows[0]['attention']}, {rows[0]['dtype']}, mm {rows[0]['mm_kernel']}", flush=True)
