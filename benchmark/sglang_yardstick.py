"""SGLang's fused token-choice kernel ``topk_softmax`` on a machine without SGLang.

SGLang ships ``topk_softmax`` as a header-only JIT CUDA kernel
(``sglang/kernels/jit/csrc/moe/moe_topk_softmax.cuh``) that ``sglang.kernels.jit.utils.load_jit``
compiles through tvm-ffi. The GPU machine has neither SGLang nor network, so this module
works in two steps:

1. Here, where SGLang is installed (``--stage``): copy what the compile needs into a
   staging directory (default ``.sgl_yardstick/`` at the repo root, excluded from git):

     include/      sglang/kernels/jit/include (the sgl_kernel/*.h headers)
     csrc/         the kernel's .cuh (same relative path as under sglang/kernels/jit/csrc)
     whl/          the apache-tvm-ffi wheel for CPython 3.12 (abi3) manylinux x86_64
     manifest.json what ``load_jit`` is asked for, recorded by calling SGLang's own
                   ``_jit_moe_topk_softmax_module`` with ``load_jit`` replaced by a recorder:
                   module args (``make_cpp_args(dtype)``), the generated wrapper source
                   (``TVM_FFI_DLL_EXPORT_TYPED_FUNC(topk_softmax, (topk_softmax<bf16_t>))``),
                   extra flags (``--use_fast_math``), SGLang's default cflags and the
                   non-arch part of its default CUDA target flags.

2. On the GPU machine (``load(dir)``, used by ``bench_routing.py``): import tvm_ffi (from
   the staged wheel, unpacked into a temporary site dir, when it is not importable), build
   the recorded wrapper with ``tvm_ffi.cpp.build`` for the local GPU (``sm_90a`` on H100,
   ``-DSGL_CUDA_ARCH=900``, as SGLang targets it), load it with ``tvm_ffi.load_module`` and
   return ``fn(topk_weights, topk_ids, gating_output, renormalize, moe_softcapping=0.0,
   correction_bias=None)`` with the meaning of ``sglang.kernels.ops.moe.topk_softmax``
   (destination passing; the softmax workspace is sized as that wrapper sizes it).

Flags: tvm-ffi's build puts ``-std=c++17 -O2`` first and SGLang's ``-std=c++20 -O3
--expt-relaxed-constexpr -DSGL_CUDA_ARCH=.. --use_fast_math`` after them (nvcc keeps the
last ``-std``/``-O``), so the device code is compiled as SGLang compiles it.

    python benchmark/sglang_yardstick.py --stage [DIR]           # here, with SGLang installed
    python benchmark/sglang_yardstick.py --compile-only --arch 9.0a [--dir DIR]  # no GPU needed
    python benchmark/sglang_yardstick.py --check [--dir DIR] [--no-fused]        # on the GPU
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".sgl_yardstick"
TVM_FFI_VERSION = "0.1.11"
_TAG = "[sglang_yardstick]"
_DTYPES = ("bfloat16", "float16", "float32")
# Staged wheels: tvm-ffi (cp312 abi3) and its one dependency, used only when the GPU
# machine's Python lacks it (torch normally brings typing-extensions).
_WHEELS = ((f"apache-tvm-ffi=={TVM_FFI_VERSION}", f"apache_tvm_ffi-{TVM_FFI_VERSION}-*.whl"),
           ("typing-extensions>=4.5", "typing_extensions-*.whl"))


def _say(msg: str) -> None:
    print(f"{_TAG} {msg}", flush=True)


# --------------------------------------------------------------------------------------
# 1. staging (needs SGLang)
# --------------------------------------------------------------------------------------
def _record_load_jit_requests():
    """What SGLang's topk_softmax asks ``load_jit`` for, per gating dtype."""
    import torch

    import sglang.kernels.ops.moe.moe_topk_softmax as ops
    from sglang.kernels.jit.utils.arch import ArchInfo, get_default_target_flags
    from sglang.kernels.jit.utils.compile.paths import (DEFAULT_CFLAGS, DEFAULT_LDFLAGS,
                                                        KERNEL_PATH)
    from sglang.kernels.jit.utils.compile.spec import _wrapper_source

    recorded = []
    real = ops.load_jit
    ops.load_jit = lambda *args, **kwargs: recorded.append((args, kwargs)) or object()
    try:
        for name in _DTYPES:
            # Bypass cache_once so nothing cached is returned and nothing is compiled.
            ops._jit_moe_topk_softmax_module.__wrapped__(getattr(torch, name))
    finally:
        ops.load_jit = real

    probe = ArchInfo(9, 0, "a")
    target_flags = [f for f in get_default_target_flags(probe) if f != probe.jit_flag]
    variants, cuda_files = {}, []
    for name, (args, kw) in zip(_DTYPES, recorded):
        unknown = set(kw) - {"cuda_files", "cuda_wrappers", "extra_cuda_cflags", "extra_cflags",
                             "extra_ldflags"}
        if unknown or kw.get("cpp_files") or kw.get("cpp_wrappers"):
            raise RuntimeError(f"unexpected load_jit request for {name}: {kw}")
        rel = []
        for f in kw.get("cuda_files", []):
            p = Path(f)
            src = p if p.is_absolute() else KERNEL_PATH / "csrc" / p
            r = p.name if p.is_absolute() else str(p)
            cuda_files.append((src, r))
            rel.append(r)
        variants[name] = {
            "module_args": [str(a) for a in args],
            "wrapper_source": _wrapper_source(tuple(rel), tuple(map(tuple, kw["cuda_wrappers"]))),
            "extra_cuda_cflags": list(kw.get("extra_cuda_cflags") or []),
            "extra_cflags": list(kw.get("extra_cflags") or []),
            "extra_ldflags": list(kw.get("extra_ldflags") or []),
        }
    common = {
        "default_cflags": list(DEFAULT_CFLAGS),
        "default_ldflags": list(DEFAULT_LDFLAGS),
        "default_target_flags_without_arch": target_flags,
        "arch_define": "-DSGL_CUDA_ARCH={sm}",  # ArchInfo.jit_flag: major * 100 + minor * 10
    }
    return KERNEL_PATH, variants, common, cuda_files


def _exclude_from_git(dest: Path) -> None:
    try:
        rel = dest.resolve().relative_to(REPO)
    except ValueError:
        return
    git_dir = REPO / ".git"
    if not git_dir.is_dir():
        return
    exclude = git_dir / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    line = f"/{rel.as_posix()}/"
    text = exclude.read_text() if exclude.exists() else ""
    if line not in text.splitlines():
        exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
        _say(f"added {line} to {exclude}")


def stage(dest: Path) -> int:
    try:
        import sglang

        kernel_path, variants, common, cuda_files = _record_load_jit_requests()
    except Exception as exc:  # noqa: BLE001
        _say(f"cannot stage: SGLang's topk_softmax is not importable here ({exc!r})")
        return 1
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    _exclude_from_git(dest)
    for sub in ("include", "csrc"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    shutil.copytree(kernel_path / "include", dest / "include",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for src, rel in dict.fromkeys(cuda_files):
        (dest / "csrc" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / "csrc" / rel)

    whl = dest / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    wheels = {}
    for req, pattern in _WHEELS:
        have = sorted(whl.glob(pattern))
        if not have:
            python = sys.executable if _has_pip(sys.executable) else "python3"
            cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp",
                   "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                   "--platform", "manylinux2014_x86_64", "-d", str(whl), req]
            _say(" ".join(cmd))
            rc = subprocess.run(cmd, check=False).returncode
            have = sorted(whl.glob(pattern))
            if rc != 0 or not have:
                _say(f"pip download of {req} failed")
                return 1
        wheels[re.split(r"[=<>]", req)[0]] = have[-1].name
    manifest = {
        "sglang_version": getattr(sglang, "__version__", "?"),
        "tvm_ffi_version": TVM_FFI_VERSION,
        "wheels": wheels,
        "source": "sglang.kernels.ops.moe.moe_topk_softmax._jit_moe_topk_softmax_module",
        "common": common,
        "variants": variants,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    _say(f"staged SGLang {manifest['sglang_version']} topk_softmax into {dest} "
         f"({size / 2**20:.2f} MiB)")
    return 0


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True,
                          check=False).returncode == 0


# --------------------------------------------------------------------------------------
# 2. loading (GPU machine; no SGLang needed)
# --------------------------------------------------------------------------------------
def _import_tvm_ffi(dest: Path, manifest: dict):
    try:
        import tvm_ffi  # noqa: F401
        import tvm_ffi.cpp  # noqa: F401

        return tvm_ffi
    except ImportError:
        pass
    wheels = [dest / "whl" / name for name in manifest["wheels"].values()]
    missing = [w.name for w in wheels if not w.exists()]
    if missing:
        raise RuntimeError(f"tvm_ffi not importable and {missing} not staged (re-run --stage)")
    if sys.version_info < (3, 12):
        raise RuntimeError("the staged tvm_ffi wheel needs CPython >= 3.12 (cp312-abi3)")
    tag = hashlib.sha256("|".join(w.name for w in wheels).encode()).hexdigest()[:12]
    site = Path(tempfile.gettempdir()) / "sgl_yardstick_site" / f"tvm_ffi-{tag}"
    if not (site / "tvm_ffi" / "__init__.py").exists():
        tmp = Path(tempfile.mkdtemp(prefix="sgl_yardstick_site_"))
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
               "--disable-pip-version-check", "--target", str(tmp)] + [str(w) for w in wheels]
        if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
            # A wheel's packages sit at the archive root: unpacking it is an install here.
            for w in wheels:
                with zipfile.ZipFile(w) as zf:
                    zf.extractall(tmp)
        site.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(site)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    # Appended, not prepended: packages the Python already has (typing_extensions) win.
    sys.path.append(str(site))
    importlib.invalidate_caches()
    import tvm_ffi
    import tvm_ffi.cpp  # noqa: F401

    return tvm_ffi


def _arch(arch: str | None):
    """(``major.minor+suffix`` for TVM_FFI_CUDA_ARCH_LIST, SGL_CUDA_ARCH value)."""
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        # SGLang's _cuda_arch_suffix: arch-specific target on Hopper+, family target on
        # SM120 with a CUDA >= 12.9 nvcc (assumed here).
        suffix = "a" if major >= 9 else ""
        if (major, minor) == (12, 0):
            suffix = "f"
        arch = f"{major}.{minor}{suffix}"
    major, rest = arch.split(".")
    minor = "".join(c for c in rest if c.isdigit())
    return arch, int(major) * 100 + int(minor) * 10


def _cuda_home():
    """CUDA_HOME as tvm-ffi would guess it, corrected when ``nvcc`` on PATH is a wrapper
    script (then ``$(which nvcc)/../..`` has no lib64/libcudart.so): ask nvcc for its TOP."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None or (Path(nvcc).parent.parent / "lib64" / "libcudart.so").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "e.cu").write_text("")
        out = subprocess.run([nvcc, "-dryrun", "-c", "e.cu", "-o", "e.o"], cwd=tmp,
                             capture_output=True, text=True, check=False)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            if (top / "bin" / "nvcc").exists():
                return str(top)
    return None


def _ensure_ninja() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja  # pip package ships the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except Exception:  # noqa: BLE001
        raise RuntimeError("ninja not found (tvm_ffi.cpp.build needs it)") from None


def build_module(dest: Path, dtype_name: str = "bfloat16", arch: str | None = None,
                 verbose: bool = True):
    """Compile (or reuse) SGLang's topk_softmax module for one gating dtype; returns its path."""
    dest = Path(dest).resolve()
    manifest = json.loads((dest / "manifest.json").read_text())
    tvm_ffi = _import_tvm_ffi(dest, manifest)
    _ensure_ninja()
    v = manifest["variants"][dtype_name]
    c = manifest["common"]
    arch_list, sm = _arch(arch)
    cuda_cflags = ([c["arch_define"].format(sm=sm)] + c["default_target_flags_without_arch"]
                   + v["extra_cuda_cflags"])
    cflags = c["default_cflags"] + v["extra_cflags"]
    ldflags = c["default_ldflags"] + v["extra_ldflags"]
    name = "sgl_kernel_jit_" + "_".join(v["module_args"])
    key = hashlib.sha256(json.dumps([v, c, arch_list, tvm_ffi.__version__, str(dest)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SGL_YARDSTICK_CACHE",
                                Path.home() / ".cache" / "sgl_yardstick"))
    build_dir = cache / f"{name}_sm{arch_list.replace('.', '')}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    wrapper = build_dir / "cuda.cu"
    if not wrapper.exists() or wrapper.read_text() != v["wrapper_source"]:
        wrapper.write_text(v["wrapper_source"])
    env = {"TVM_FFI_CUDA_ARCH_LIST": arch_list}
    home = _cuda_home()
    if home:
        env["CUDA_HOME"] = home
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if verbose:
            _say(f"building {name} (sm_{arch_list.replace('.', '')}, tvm_ffi "
                 f"{tvm_ffi.__version__} from {Path(tvm_ffi.__file__).parent.parent}) in {build_dir}")
        lib = tvm_ffi.cpp.build(
            name,
            cuda_files=[str(wrapper)],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(dest / "include"), str(dest / "csrc")],
            build_directory=str(build_dir),
            backend="cuda",
        )
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    return tvm_ffi, lib


def load(dest: Path | str = DEFAULT_DIR, verbose: bool = True):
    """``fn(topk_weights, topk_ids, gating_output, renormalize, moe_softcapping=0.0,
    correction_bias=None)`` running SGLang's JIT topk_softmax, or None (with a message)."""
    dest = Path(dest)
    if not (dest / "manifest.json").exists():
        if verbose:
            _say(f"no staged SGLang kernel in {dest} (run `python benchmark/sglang_yardstick.py "
                 "--stage` where SGLang is installed)")
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        tvm_ffi, lib = build_module(dest, "bfloat16", verbose=verbose)
        modules = {torch.bfloat16: tvm_ffi.load_module(lib)}
    except Exception as exc:  # noqa: BLE001
        if verbose:
            _say(f"SGLang topk_softmax unavailable: {exc}")
        return None

    def module_for(dtype):
        mod = modules.get(dtype)
        if mod is None:
            _, path = build_module(dest, str(dtype).removeprefix("torch."), verbose=verbose)
            mod = modules[dtype] = tvm_ffi.load_module(path)
        return mod

    def topk_softmax(topk_weights, topk_ids, gating_output, renormalize=False,
                     moe_softcapping=0.0, correction_bias=None):
        num_tokens, num_experts = gating_output.shape
        # As sglang.kernels.ops.moe.topk_softmax: the warp-specialised path (power-of-two
        # E <= 512) needs no scratch, the two-pass softmax + top-k path needs T * E floats.
        is_pow2 = num_experts != 0 and (num_experts & (num_experts - 1)) == 0
        needs_workspace = not is_pow2 or num_experts > 512
        workspace = torch.empty(num_tokens * num_experts if needs_workspace else 1,
                                dtype=torch.float32, device=gating_output.device)
        module_for(gating_output.dtype).topk_softmax(
            topk_weights, topk_ids, gating_output, workspace, bool(renormalize),
            float(moe_softcapping), correction_bias)

    topk_softmax.source = f"SGLang JIT topk_softmax staged in {dest}"
    if verbose:
        _say(f"loaded SGLang topk_softmax from {lib}")
    return topk_softmax


# --------------------------------------------------------------------------------------
# 3. GPU self-check: correctness against the reference, CUDA-graph timing
# --------------------------------------------------------------------------------------
def check(dest: Path, with_fused: bool) -> int:
    """Correctness of SGLang's kernel (and ours, ``with_fused``) against the token-choice
    reference, then CUDA-graph timings; a ratio involving a kernel that failed its check is
    refused (``harness.Checks``). Returns 1 when a check failed."""
    import torch

    sys.path.insert(0, str(REPO / "python"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import Checks, compare_token_choice, md_table, time_graph, torch_token_choice

    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.reference import token_choice_topk_reference

    fn = load(dest)
    if fn is None:
        return 1
    fused = None
    if with_fused:
        try:
            from sglang_moe_routing.expert_choice import cuda as ec_cuda

            ec_cuda.load_extension()
            fused = lambda x, k: ec_cuda.token_choice_topk_cuda(x, RoutingSpec(k))  # noqa: E731
        except Exception as exc:  # noqa: BLE001
            print(f"fused_tc unavailable: {exc}")
    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}")
    torch.manual_seed(0)
    checks = Checks()
    timed = [(T, E, k) for T in (1, 128, 1024, 8192, 32768) for E in (8, 64, 256) for k in (2, 8)]
    print("# correctness vs the token-choice reference (ids equal up to exact ties, weights "
          "within 1e-5), bf16 logits, every timed point")
    inputs = {}
    for T, E, k in timed:
        logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
        w = torch.empty(T, k, dtype=torch.float32, device="cuda")
        ids = torch.empty(T, k, dtype=torch.int32, device="cuda")
        inputs[T, E, k] = logits, w, ids
        ref = token_choice_topk_reference(logits, RoutingSpec(k))
        probs = torch.softmax(logits.float(), dim=-1)
        fn(w, ids, logits, True)
        got = {"sglang_tc": (w, ids), "torch_tc": torch_token_choice(logits, k)}
        if fused is not None:
            got["fused_tc"] = fused(logits, k)
        verdicts = {name: checks.record((name, T, E, k), compare_token_choice(gw, gi, probs, *ref))
                    for name, (gw, gi) in got.items()}
        print(f"T={T:5d} E={E:3d} k={k}: " + ", ".join(
            f"{name} {'OK' if v is None else 'FAIL (' + v + ')'}" for name, v in verdicts.items()))
    print(checks.summary())

    print("\n# us per call, CUDA-graph replay (20 calls per graph), bf16 logits")
    print(md_table(["T", "E", "k", "torch TC", "sglang TC", "fused TC (ours)", "torch/sglang",
                    "fused/sglang"], []))
    for T, E, k in timed:
        logits, w, ids = inputs[T, E, k]
        inner = 20 if T <= 8192 else 5
        tt = time_graph(lambda: torch_token_choice(logits, k), inner=inner)
        st = time_graph(lambda: fn(w, ids, logits, True), inner=inner)
        ft = (time_graph(lambda: fused(logits, k), inner=inner) if fused is not None
              else float("nan"))
        row = [T, E, k, f"{tt:.2f}", f"{st:.2f}", f"{ft:.2f}",
               checks.ratio(tt, st, ("torch_tc", T, E, k), ("sglang_tc", T, E, k)),
               checks.ratio(ft, st, ("fused_tc", T, E, k), ("sglang_tc", T, E, k))]
        print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return checks.exit_code()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="?", const=str(DEFAULT_DIR), metavar="DIR",
                    help="stage SGLang's kernel sources and the tvm-ffi wheel into DIR")
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="staged directory (for loading)")
    ap.add_argument("--compile-only", action="store_true",
                    help="build the bf16 module only (no GPU needed with --arch)")
    ap.add_argument("--arch", help="target for --compile-only, e.g. 9.0a (default: local GPU)")
    ap.add_argument("--check", action="store_true",
                    help="GPU: correctness vs the token-choice reference and CUDA-graph timings "
                         "(ratios refused where a check failed; exit 1 then)")
    ap.add_argument("--no-fused", action="store_true", help="--check without our fused TC kernel")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.stage:
        return stage(Path(args.stage))
    if args.compile_only:
        try:
            _, lib = build_module(Path(args.dir), "bfloat16", arch=args.arch)
        except Exception as exc:  # noqa: BLE001
            _say(f"build failed: {exc}")
            return 1
        _say(f"built {lib}")
        return 0
    if args.check:
        return check(Path(args.dir), with_fused=not args.no_fused)
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
