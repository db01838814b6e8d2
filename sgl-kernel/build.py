"""Ahead-of-time build of the expert-choice CUDA kernels.

    python sgl-kernel/build.py [--arch 9.0] [--build-dir DIR] [-v]

Runs the same ``torch.utils.cpp_extension.load`` as the first call of
``sglang_moe_routing.expert_choice.cuda`` would, into the directory that call looks in
(``sgl-kernel/build/<torch>_<cuda>_<arch>``, or ``--build-dir`` /
``$SGLANG_MOE_ROUTING_BUILD_DIR``), so that at run time the module is only imported.
The .so is tied to this torch/CUDA version; the loader rebuilds when the sources change.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST, e.g. 9.0 (default: this GPU's)")
    ap.add_argument("--build-dir", help="output directory (default: sgl-kernel/build/<tag>)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    if args.build_dir:
        os.environ["SGLANG_MOE_ROUTING_BUILD_DIR"] = args.build_dir
    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    t0 = time.time()
    mod = ec_cuda.load_extension(verbose=args.verbose)
    print(f"built {mod.__file__} in {time.time() - t0:.1f} s (build dir {ec_cuda.build_directory()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
