"""Raw CUDA-event times of the compute-aware EPLB GPU test's regions, per pass, in three set-ups.

  cold-idle : as the first version of test_eplb_gpu.py: counts copied with a pageable
              ``.cuda()`` (syncs the stream) right before each region, cold cuBLAS/allocator
  warm-idle : the same passes again (every shape seen once): what is left is launch overhead
  ahead     : each pass queued behind a sleep, counts already on the device (the fixed test)

Per sample: event ms, host ms spent issuing the region, and whether the device had already
passed the start event when the region was issued (the profiler's ``host_bound`` flag).
Run: PYTHONPATH=python python3 benchmark/eplb_event_diag.py
"""

import statistics
import time

import torch

from sglang_moe_routing.eplb.profiler import ExpertComputeProfiler


def main() -> None:
    torch.manual_seed(0)
    E, steps = 8, 43
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {d: [torch.randn(d, d, device="cuda", dtype=torch.bfloat16, generator=g) / d**0.5 for _ in range(4)]
         for d in (1024, 2048)}
    xs = {d: torch.randn(4096, d, device="cuda", dtype=torch.bfloat16) for d in (1024, 2048)}
    counts = torch.randint(0, 4096, (steps, E))
    counts[torch.rand(steps, E) < 0.2] = 0
    counts_dev = counts.cuda()
    ids_dev = torch.arange(E, device="cuda").view(2, 4)
    dims = (1024, 2048)

    def phase(name: str, ahead: bool) -> None:
        prof = ExpertComputeProfiler(1, E, warmup_steps=3, num_classes=2, tile_sizes=(1, 64, 128))
        prof.set_expert_classes(0, [0] * 4 + [1] * 4)
        rows = []
        for step in range(steps):
            profiled = prof.begin_step()
            if ahead:
                torch.cuda.synchronize()
                torch.cuda._sleep(int(20e6))
            for cls in (0, 1):
                c = counts[step, 4 * cls : 4 * cls + 4]
                cd = counts_dev[step, 4 * cls : 4 * cls + 4] if ahead else c.cuda()
                ids = ids_dev[cls] if ahead else (torch.arange(4) + 4 * cls).cuda()
                if not profiled:
                    for j in range(4):
                        if int(c[j]):
                            xs[dims[cls]][: int(c[j])] @ w[dims[cls]][j]
                    continue
                t0 = time.perf_counter()
                start, end = prof.new_event(True), prof.new_event(True)
                start.record()
                for j in range(4):
                    n = int(c[j])
                    if n:
                        xs[dims[cls]][:n] @ w[dims[cls]][j]
                end.record()
                host_ms = (time.perf_counter() - t0) * 1e3
                reached = start.query()  # what record_kernel checks for ``host_bound``
                prof.record_kernel(0, start, end, cd, ids, cls)
                rows.append((step, cls, int(c.sum()), start, end, host_ms, int(reached)))
            prof.end_step()
        torch.cuda.synchronize()
        prof.poll(block=True)
        ev = [(s, c, n, a.elapsed_time(b), h, hb) for s, c, n, a, b, h, hb in rows]
        print(f"== {name}: step cls tokens event_ms host_ms host_bound (first 12)")
        for r in ev[:12]:
            print("  %3d %d %6d %9.4f %8.4f %d" % r)
        for cls in (0, 1):
            t = [r[3] for r in ev if r[1] == cls]
            print(f"  cls{cls}: event ms median {statistics.median(t):.4f} max {max(t):.4f}; "
                  f"host_bound {sum(r[5] for r in ev if r[1] == cls)}/{len(t)}")
        print("  " + prof.format_summary())
        for cls, m in prof.get_cost_model(0).items():
            print(f"  fit cls{cls}: a={m.a_ms*1e3:.2f}us b/tile={m.b_ms*1e6/m.tile:.3f}ns/token "
                  f"tile={m.tile} c={m.c_ms*1e3:.2f}us rmse={m.rmse_ms*1e3:.2f}us")

    print("torch", torch.__version__, torch.cuda.get_device_name(), "CUDA_MODULE_LOADING=",
          __import__("os").environ.get("CUDA_MODULE_LOADING"))
    phase("cold-idle", ahead=False)
    phase("warm-idle", ahead=False)
    phase("ahead", ahead=True)


if __name__ == "__main__":
    main()
