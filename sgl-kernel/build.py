"""Ahead-of-time build of the expert-choice CUDA kernels.

    python sgl-kernel/build.py [--arch 9.0] [--build-dir DIR] [-v] [--print-build-dir]

Runs the same ``torch.utils.cpp_extension.load`` as the first call of
``sglang_moe_routing.expert_choice.cuda`` would (``load_extension``), into the directory that
call looks in (``build_directory()``: ``$SGLANG_MOE_ROUTING_BUILD_DIR``, else
``$XDG_CACHE_HOME/sglang_moe_routing/ec_cuda/<torch>_<cuda>_<arch>_<source hash>``, with
``~/.cache`` by default), so that at run time the module is only imported. The .so is tied
to this torch/CUDA version and these sources (a changed source gives a new directory).

``--arch`` (``TORCH_CUDA_ARCH_LIST`` syntax) defaults to ``$TORCH_CUDA_ARCH_LIST``, else the
visible GPU's capability; a build for a GPU other than the one it will run on must give
``--arch`` and the run must see the same ``TORCH_CUDA_ARCH_LIST`` (or none, on that GPU) to
find it. The architecture goes to nvcc as ``-gencode`` flags of this build only; the
environment is not changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if (REPO / "python" / "sglang_moe_routing").is_dir():
    sys.path.insert(0, str(REPO / "python"))  # this checkout's package, installed or not


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST syntax, e.g. 9.0 (default: $TORCH_CUDA_ARCH_LIST, else this GPU's)")
    ap.add_argument("--build-dir", help="output directory (default: the loader's build_directory())")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--print-build-dir", action="store_true",
                    help="print the build directory (the loader's, for this --arch) and exit")
    args = ap.parse_args()
    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    build_dir = Path(args.build_dir) if args.build_dir else ec_cuda.build_directory(args.arch)
    if args.print_build_dir:
        print(build_dir)
        return 0
    print(f"sources {ec_cuda.kernel_source_dir()}, nvcc arch flags "
          f"{' '.join(ec_cuda.cuda_arch_flags(args.arch))}, build dir {build_dir}")
    t0 = time.time()
    mod = ec_cuda.load_extension(verbose=args.verbose, arch=args.arch, build_dir=build_dir)
    print(f"built {mod.__file__} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
