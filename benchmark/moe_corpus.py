"""The data side of ``benchmark/train_moe_lm.py``: corpus collection, held-out split,
tokenizer, token streams and their ``--data-cache`` (issue 11, item 1). Also read by
``benchmark/eval_routing_quality.py`` (held-out windows, corpus rebuilt from a checkpoint).

Corpus (never synthetic tokens): the Python standard library's ``*.py`` sources
(``sysconfig.get_paths()["stdlib"]``, without its ``site-packages`` and ``test`` trees) as the
**code** domain, and as the **prose** domain the installed packages' ``*.md``/``*.rst``/``*.txt``
files (site-packages; ``--no-site-packages`` drops them) plus the docstrings (``ast``) of the
code files. Site-packages ``*.py`` join the code domain too (``--no-site-packages-code`` drops
them); ``--max-code-mb`` / ``--max-prose-mb`` cap each domain (files taken in sorted
order). File lists are sorted; the held-out split is by FILE, by a hash of the file's path
relative to its root (``--val-percent``, default 2), so machines with the same files get the
same split.

Tokenizer: byte-level BPE (``tokenizers``) trained on the training split only, saved as
``<out>/tokenizer.json``. ``--data-cache DIR`` keeps the tokenizer and the token streams of a
corpus configuration in DIR, so a second run (say, the EC-trained model) skips corpus reading
and tokenizer training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import site
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

EOS = "<|endoftext|>"
CODE, PROSE = "code", "prose"
PROSE_EXTS = (".md", ".rst", ".txt")


# ----------------------------------------------------------------------------- corpus


@dataclass
class Doc:
    rel: str  # stable key: "<root tag>/<path relative to root>"
    domain: str
    text: str


def _is_val(rel: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")
    return (h % 10000) < val_percent * 100


def _read(path: Path, max_file_bytes: int) -> Optional[str]:
    try:
        if path.stat().st_size > max_file_bytes or path.stat().st_size < 64:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _looks_like_prose(text: str) -> bool:
    """Skip data files posing as .txt (word lists, tables of numbers, licence boilerplate ok)."""
    sample = text[:4000]
    if not sample:
        return False
    letters = sum(c.isalpha() or c == " " for c in sample)
    return letters / len(sample) > 0.7 and sample.count(" ") / len(sample) > 0.08


def _docstrings(src: str, min_chars: int = 120) -> List[str]:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) >= min_chars:
                out.append(d)
    return out


def _load(job: Tuple[str, int, bool]) -> Tuple[Optional[str], str]:
    """(text or None, joined docstrings for .py files) -- a worker-process job."""
    path, max_bytes, wanted = Path(job[0]), job[1], job[2]
    if not wanted:
        return None, ""
    text = _read(path, max_bytes)
    if text is None or path.suffix != ".py":
        return text, ""
    return text, "\n\n".join(_docstrings(text))


def _sorted_files(root: Path, exts: Tuple[str, ...], skip_dirs: Tuple[str, ...]) -> List[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and d != "__pycache__")
        for f in filenames:
            if f.endswith(exts):
                files.append(Path(dirpath) / f)
    return sorted(files)


def collect_corpus(args) -> Dict[str, Dict[str, List[Doc]]]:
    """``{"train"|"val": {"code"|"prose": [Doc]}}``: deterministic (sorted, hash split)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots: List[Tuple[str, Path, Tuple[str, ...], Tuple[str, ...]]] = [
        ("stdlib", stdlib, (".py",), ("site-packages", "dist-packages", "test", "tests",
                                     "idlelib", "lib2to3")),
    ]
    if args.site_packages:
        seen = set()
        for sp in site.getsitepackages() + [site.getusersitepackages()]:
            p = Path(sp)
            if p.is_dir() and p.resolve() not in seen:
                seen.add(p.resolve())
                exts = PROSE_EXTS + ((".py",) if args.site_packages_code else ())
                roots.append((f"site{len(seen)}", p, exts, ("test", "tests")))
    out = {s: {CODE: [], PROSE: []} for s in ("train", "val")}
    budget = {CODE: int(args.max_code_mb * 1e6), PROSE: int(args.max_prose_mb * 1e6)}
    used = {CODE: 0, PROSE: 0}
    n_files = 0
    max_bytes = args.max_file_kb * 1024
    paths = []
    for tag, root, exts, skip in roots:
        paths += [(tag, root, p) for p in _sorted_files(root, exts, skip)]
    # read + parse (docstrings) in parallel, in order, a chunk at a time, until the budgets fill
    workers = max(1, min(16, os.cpu_count() or 1))
    chunk = 64 * workers
    pool = None
    if workers > 1 and len(paths) > chunk:
        import multiprocessing as mp

        pool = mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(workers)
    try:
        for i in range(0, len(paths), chunk):
            part = paths[i:i + chunk]
            code_full = used[CODE] >= budget[CODE]  # .py files past the code budget: skipped
            jobs = [(str(p), max_bytes, not (code_full and p.suffix == ".py"))
                    for _, _, p in part]
            loaded = pool.map(_load, jobs, chunksize=8) if pool else [_load(j) for j in jobs]
            for (tag, root, path), (text, docs) in zip(part, loaded):
                if args.max_files and n_files >= args.max_files:
                    break
                if text is None:
                    continue
                rel = f"{tag}/{path.relative_to(root).as_posix()}"
                split = "val" if _is_val(rel, args.val_percent) else "train"
                if path.suffix == ".py":
                    if used[CODE] >= budget[CODE]:
                        continue
                    out[split][CODE].append(Doc(rel, CODE, text))
                    used[CODE] += len(text)
                    if docs and used[PROSE] < budget[PROSE]:
                        out[split][PROSE].append(Doc(rel + "#docstrings", PROSE, docs))
                        used[PROSE] += len(docs)
                else:
                    if used[PROSE] >= budget[PROSE] or not _looks_like_prose(text):
                        continue
                    out[split][PROSE].append(Doc(rel, PROSE, text))
                    used[PROSE] += len(text)
                n_files += 1
            if (args.max_files and n_files >= args.max_files) or all(
                    used[d] >= budget[d] for d in (CODE, PROSE)):
                break
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out


def corpus_stats(corpus) -> Dict[str, Dict[str, Dict[str, int]]]:
    return {s: {d: {"docs": len(v), "chars": sum(len(x.text) for x in v)}
                for d, v in dom.items()} for s, dom in corpus.items()}


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: List[Doc], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    tok.save(str(path))
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode_docs(tok, docs: List[Doc]) -> np.ndarray:
    """Packed stream: each doc's ids followed by EOS (docs in their sorted order)."""
    eos = tok.token_to_id(EOS)
    parts = []
    for i in range(0, len(docs), 256):
        for enc in tok.encode_batch([d.text for d in docs[i:i + 256]]):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def token_streams(tok, corpus) -> Dict[str, Dict[str, np.ndarray]]:
    return {s: {d: encode_docs(tok, v) for d, v in dom.items()} for s, dom in corpus.items()}


def fixed_windows(stream: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` evenly spaced non-overlapping windows (deterministic)."""
    total = len(stream) // seq_len
    if total == 0:
        raise ValueError(f"held-out stream too short ({len(stream)} tokens) for seq {seq_len}")
    idx = np.linspace(0, total - 1, num=min(n, total)).astype(np.int64)
    return np.stack([stream[i * seq_len:(i + 1) * seq_len] for i in idx])


_DATA_KEYS = ("val_percent", "site_packages", "site_packages_code", "max_files", "max_file_kb",
              "max_code_mb", "max_prose_mb", "vocab")


def prepare_data(args, out: Path, log):
    """Corpus, stats, tokenizer, token streams, token counts; from ``--data-cache`` when it
    holds the same corpus settings (corpus is then None)."""
    import shutil

    key = {k: getattr(args, k) for k in _DATA_KEYS}
    cache = Path(args.data_cache) if args.data_cache else None
    if cache is not None and (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        if meta["key"] == key:
            shutil.copy(cache / "tokenizer.json", out / "tokenizer.json")
            tok = load_tokenizer(out / "tokenizer.json")
            with np.load(cache / "streams.npz") as z:
                streams = {s: {d: z[f"{s}_{d}"] for d in (CODE, PROSE)} for s in ("train", "val")}
            log(f"[data] from cache {cache}: tokens {json.dumps(meta['tokens'])}")
            return None, meta["stats"], tok, streams, meta["tokens"]
        log(f"[data] cache {cache} holds other corpus settings; rebuilding it")
    corpus, stats, tok, streams, ntok = _prepare_data(args, out, log)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "tokenizer.json", cache / "tokenizer.json")
        np.savez(cache / "streams.npz",
                 **{f"{s}_{d}": v for s, dom in streams.items() for d, v in dom.items()})
        (cache / "meta.json").write_text(json.dumps(dict(key=key, stats=stats, tokens=ntok)))
    return corpus, stats, tok, streams, ntok


def _prepare_data(args, out: Path, log):
    t0 = time.time()
    corpus = collect_corpus(args)
    stats = corpus_stats(corpus)
    log(f"[data] corpus {json.dumps(stats)} ({time.time() - t0:.1f}s)")
    tok_path = out / "tokenizer.json"
    t0 = time.time()
    tok = train_tokenizer(corpus["train"][CODE] + corpus["train"][PROSE], args.vocab, tok_path)
    streams = token_streams(tok, corpus)
    ntok = {s: {d: int(len(v)) for d, v in dom.items()} for s, dom in streams.items()}
    log(f"[data] tokenizer vocab {tok.get_vocab_size()} -> {tok_path}; tokens {json.dumps(ntok)} "
        f"({time.time() - t0:.1f}s)")
    return corpus, stats, tok, streams, ntok
