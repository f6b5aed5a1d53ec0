"""Token files: documents -> BPE ids -> one ``np.memmap`` per split and domain, with a JSON manifest.

Layout of a prepared data folder (default ``cache_dir("data", "default")``)::

    tokenizer.json          byte-level BPE (trained here, or a copy of the one given)
    train.<domain>.bin      uint16 ids (uint32 when the vocabulary exceeds 65535), documents separated by EOS
    val.<domain>.bin
    manifest.json           counts per split/domain, dtype, vocab size, tokenizer sha256, sources, settings

``prepare(...)`` builds it (and reuses it when the sources, settings and corpus text are unchanged);
``TokenData(dir)`` opens it; ``BatchSampler`` draws training windows as a pure function of ``(seed, step)``
so that a resumed or multi-process run sees exactly the same data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sparkformer.config import int_at_least, number_in, read_json
from sparkformer.corpora import DEFAULT_SOURCES, Document, check_encoding, load_documents, split_documents
from sparkformer.paths import cache_dir
from sparkformer.tokenizer import Tokenizer, check_vocab, check_vocab_size, load_tokenizer, train_bpe

MANIFEST = "manifest.json"
FORMAT = "sparkformer-tokens/1"
SPLITS = ("train", "val")


def default_data_dir() -> Path:
    return cache_dir("data", "default")


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _safe(domain: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", domain) or "text"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_sources(sources: str | Sequence[str] | None) -> list[str]:
    if sources is None:
        return list(DEFAULT_SOURCES)
    if isinstance(sources, str):
        sources = sources.split(",")
    out = [s.strip() for s in sources if s.strip()]
    if not out:
        raise ValueError("no sources given; e.g. --sources shakespeare,python-stdlib")
    return out


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---- prepare -----------------------------------------------------------------------------------------------------
def prepare(
    sources: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    vocab_size: int = 8192,
    max_bytes_per_source: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.05,
    force: bool = False,
    quiet: bool = False,
    encoding: str = "utf-8",
) -> Path:
    """Read ``sources``, split by document, train (or load) the tokenizer, write token files; return the folder.

    ``tokenizer``: an existing tokenizer.json / HF tokenizer folder to use instead of training a BPE
    (then ``vocab_size`` is the tokenizer's). Reuses ``out`` when it already holds the same preparation.
    ``encoding``: of the text files given by path (binary files are refused, or skipped inside a folder).
    Every argument is checked before anything is written, and the files are built in a temporary folder and moved
    into ``out`` at the end, so a refused or failed preparation leaves nothing behind. An empty train split, and
    an empty validation split when ``val_fraction > 0``, are refused.
    """
    names = _parse_sources(sources)
    out = Path(out).expanduser() if out is not None else default_data_dir()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if max_bytes_per_source is not None and max_bytes_per_source < 1:
        raise ValueError(f"max_bytes_per_source={max_bytes_per_source} must be >= 1 (or unset for everything)")
    check_encoding(encoding)
    t0 = time.time()

    docs: list[Document] = []
    per_source = []
    for name in names:
        ds = load_documents(name, max_bytes=max_bytes_per_source, encoding=encoding)
        if not ds:
            raise ValueError(f"source {name!r} gave no documents")
        docs += ds
        per_source.append({"name": name, "documents": len(ds), "chars": sum(len(d.text) for d in ds),
                           "domains": sorted({d.domain for d in ds})})
        _log(f"  source {name}: {len(ds)} documents, {per_source[-1]['chars'] / 1e6:.2f} M chars, "
             f"domains {', '.join(per_source[-1]['domains'])}", quiet)
    seen: set[str] = set()
    for d in docs:
        if d.source in seen:
            raise ValueError(f"document id {d.source!r} occurs twice; is a source listed twice?")
        seen.add(d.source)

    corpus = hashlib.sha256()
    for d in docs:
        corpus.update(f"{d.domain}\0{d.source}\0{len(d.text)}\0".encode())
        corpus.update(d.text.encode("utf-8"))
    settings = {
        "sources": names,
        "max_bytes_per_source": max_bytes_per_source,
        "val_fraction": val_fraction,
        "vocab_size": None if tokenizer is not None else vocab_size,
        "tokenizer_from": None if tokenizer is None else str(tokenizer),
        "corpus_sha256": corpus.hexdigest(),
    }
    if encoding != "utf-8":
        settings["encoding"] = encoding
    if tokenizer is not None:
        tok_in = load_tokenizer(tokenizer)
        settings["tokenizer_sha256_in"] = tok_in.sha256
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    manifest_path = out / MANIFEST
    if not force and manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("settings_key") == key and verify(out, quiet=True):
                _log(f"reusing prepared data in {out} (same sources and settings)", quiet)
                return out
        except (ValueError, OSError):
            pass

    split = split_documents(docs, val_fraction)
    if not split["train"]:
        raise ValueError("no training documents after the split; give more text or a smaller val_fraction")
    if val_fraction > 0 and not split["val"]:
        doms = sorted({d.domain for d in docs})
        raise ValueError(f"no validation documents: the sources give {len(docs)} document(s) in domain(s) "
                         f"{', '.join(doms)}, and a domain needs at least 2 to hold one out; give more documents (a "
                         "folder of files, or a .jsonl with one per line) or --val-fraction 0 to train without "
                         "validation")
    domains = sorted({d.domain for d in docs})
    clash = {_safe(a) for a in domains if sum(_safe(a) == _safe(b) for b in domains) > 1}
    if clash:
        raise ValueError(f"domains {[a for a in domains if _safe(a) in clash]} map to the same file name; rename one")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        manifest = _build(work, split, docs, per_source, settings, key, vocab_size,
                          tok_in if tokenizer is not None else None, quiet)
        _install(work, out, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"prepared {out} in {time.time() - t0:.1f} s", quiet)
    return out


def _install(work: Path, out: Path, manifest: dict) -> None:
    """Move the files built in ``work`` into ``out``: the old manifest goes first (the folder is incomplete until
    the new one is written), then the old token files, then the new files, the manifest last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for f in out.glob("*.bin"):
        f.unlink()
    for f in sorted(work.iterdir()):
        if f.name != MANIFEST:
            os.replace(f, out / f.name)
    os.replace(work / MANIFEST, out / MANIFEST)


def _build(out: Path, split: dict, docs: list[Document], per_source: list, settings: dict, key: str,
           vocab_size: int, tok_in: Tokenizer | None, quiet: bool) -> dict:
    """Train a tokenizer (or use ``tok_in``) and write the token files and the manifest into ``out``; returns the
    manifest."""
    if tok_in is None:
        _log(f"training byte-level BPE (vocab {vocab_size}) on {len(split['train'])} train documents ...", quiet)
        t = time.time()
        tok = train_bpe((d.text for d in split["train"]), vocab_size=vocab_size, length=len(split["train"]))
        _log(f"  tokenizer: {tok.vocab_size} tokens in {time.time() - t:.1f} s", quiet)
    else:
        tok = tok_in
    tok.save(out / "tokenizer.json")
    dtype = _dtype_for(tok.vocab_size)

    splits: dict[str, dict[str, dict]] = {}
    total_docs = sum(len(v) for v in split.values())
    progress = _progress(total_docs, quiet)
    for s in SPLITS:
        splits[s] = {}
        by_domain: dict[str, list[Document]] = {}
        for d in split[s]:
            by_domain.setdefault(d.domain, []).append(d)
        for domain in sorted(by_domain):
            fname = f"{s}.{_safe(domain)}.bin"
            n_tok = 0
            tmp = out / (fname + ".tmp")
            with open(tmp, "wb") as fh:
                group = by_domain[domain]
                for i in range(0, len(group), 256):
                    chunk = group[i: i + 256]
                    for ids in tok.encode_batch([d.text for d in chunk]):
                        ids.append(tok.eos_id)
                        np.asarray(ids, dtype=dtype).tofile(fh)
                        n_tok += len(ids)
                    progress.update(len(chunk))
            os.replace(tmp, out / fname)
            splits[s][domain] = {"file": fname, "tokens": n_tok, "documents": len(by_domain[domain])}
    progress.close()

    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tok.sha256,
        "sources": per_source,
        "splits": splits,
        "settings": settings,
        "settings_key": key,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _progress(total: int, quiet: bool):
    if quiet:
        class _Null:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Null()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tokenizing", unit="doc", file=sys.stderr, leave=False)


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir).expanduser() / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path.parent} holds no prepared data ({MANIFEST} missing); run "
                                f"`sparkformer data prepare --out {path.parent}` first")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {m.get('format') if isinstance(m, dict) else m!r} (expected "
                         f"{FORMAT}); prepare the data again")
    return m


def verify(data_dir: str | Path, quiet: bool = False) -> bool:
    """Files exist with the sizes the manifest says and the tokenizer hash matches."""
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    item = np.dtype(m["dtype"]).itemsize
    ok = sha256_file(data_dir / m["tokenizer"]) == m["tokenizer_sha256"]
    for s, doms in m["splits"].items():
        for domain, info in doms.items():
            f = data_dir / info["file"]
            if not f.exists() or f.stat().st_size != info["tokens"] * item:
                ok = False
    if not ok and not quiet:
        print(f"{data_dir}: files do not match {MANIFEST}", file=sys.stderr)
    return ok


def summary(data_dir: str | Path) -> str:
    m = read_manifest(data_dir)
    lines = [f"{'split':<6} {'domain':<14} {'documents':>9} {'tokens':>12}"]
    for s, doms in m["splits"].items():
        for domain, info in doms.items():
            lines.append(f"{s:<6} {domain:<14} {info['documents']:>9} {info['tokens']:>12,}")
    total = sum(i["tokens"] for d in m["splits"].values() for i in d.values())
    lines.append(f"total {total:,} tokens ({m['dtype']}), vocab {m['vocab_size']}, "
                 f"tokenizer sha256 {m['tokenizer_sha256'][:12]}")
    return "\n".join(lines)


# ---- reading -------------------------------------------------------------------------------------------------
class TokenData:
    """A prepared data folder: ``tokens(split, domain)`` memmaps, the tokenizer, the manifest."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir).expanduser()
        self.manifest = read_manifest(self.dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eos_id = int(self.manifest["eos_id"])
        self._mm: dict[tuple[str, str], np.ndarray] = {}

    def domains(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {self.dir}; available: {list(self.manifest['splits'])}")
        return [d for d, i in self.manifest["splits"][split].items() if i["tokens"] > 0]

    def tokens(self, split: str, domain: str) -> np.ndarray:
        key = (split, domain)
        if key not in self._mm:
            info = self.manifest["splits"][split][domain]
            self._mm[key] = np.memmap(self.dir / info["file"], dtype=self.dtype, mode="r", shape=(info["tokens"],))
        return self._mm[key]

    def num_tokens(self, split: str) -> int:
        return sum(i["tokens"] for i in self.manifest["splits"].get(split, {}).values())

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir / self.manifest["tokenizer"])

    def check_model_vocab(self, model_vocab_size: int) -> None:
        check_vocab(model_vocab_size, self.vocab_size, where=f"data {self.dir}")


@dataclass
class BatchSampler:
    """Training windows as a pure function of ``(seed, step)``.

    Each step draws ``batch_size`` windows of ``seq_len + 1`` tokens uniformly over all training windows of all
    domains (so domains are mixed in proportion to their size). ``rows`` selects which rows of that global batch
    to materialise (a rank's share of a micro-batch), so any world size sees the same global batch.
    """

    data: TokenData
    seq_len: int
    batch_size: int
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        self.domains = self.data.domains(self.split)
        counts = np.array([max(0, len(self.data.tokens(self.split, d)) - self.seq_len) for d in self.domains], np.int64)
        if counts.sum() <= 0:
            longest = max((len(self.data.tokens(self.split, d)) for d in self.domains), default=0)
            raise ValueError(f"seq_len={self.seq_len} is too long for the {self.split} data in {self.data.dir} "
                             f"(longest domain has {longest} tokens); lower seq_len or prepare more text")
        self._cum = np.cumsum(counts)

    def starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, offset) of every window of the global batch at ``step``."""
        rng = np.random.default_rng([self.seed, step])
        u = rng.integers(0, int(self._cum[-1]), size=self.batch_size, dtype=np.int64)
        dom = np.searchsorted(self._cum, u, side="right")
        off = u - np.concatenate([[0], self._cum[:-1]])[dom]
        return dom, off

    def batch(self, step: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)`` int64 arrays of shape [rows, seq_len]; targets are inputs shifted by one."""
        dom, off = self.starts(step)
        if rows is not None:
            dom, off = dom[rows], off[rows]
        buf = np.empty((len(dom), self.seq_len + 1), dtype=np.int64)
        for i, (d, o) in enumerate(zip(dom, off)):
            buf[i] = self.data.tokens(self.split, self.domains[d])[o: o + self.seq_len + 1]
        return buf[:, :-1], buf[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """Start offsets of evaluation windows: ``count`` evenly spaced ones (fixed, no RNG), or with ``count=None``
    every non-overlapping window (the whole split, for perplexity)."""
    n = len(tokens) - seq_len - 1
    if n < 0:
        return np.zeros(0, dtype=np.int64)
    if count is None:
        return np.arange(0, n + 1, seq_len, dtype=np.int64)
    return np.unique(np.linspace(0, n, num=count).round().astype(np.int64))


# ---- CLI -----------------------------------------------------------------------------------------------------
def _totals(out: Path) -> dict:
    m = read_manifest(out)
    return {"data_dir": str(out), "vocab_size": m["vocab_size"], "tokenizer_sha256": m["tokenizer_sha256"],
            **{f"{s}_tokens": sum(i["tokens"] for i in doms.values()) for s, doms in m["splits"].items()},
            **{f"{s}_documents": sum(i["documents"] for i in doms.values()) for s, doms in m["splits"].items()},
            "domains": sorted({d for doms in m["splits"].values() for d in doms})}


def _cmd_prepare(args: argparse.Namespace) -> int:
    out = prepare(sources=args.sources, out=args.out, vocab_size=args.vocab_size,
                  max_bytes_per_source=args.max_bytes_per_source, tokenizer=args.tokenizer,
                  val_fraction=args.val_fraction, force=args.force, encoding=args.encoding)
    print(summary(out))
    print(json.dumps(_totals(out)))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    d = Path(args.dir).expanduser() if args.dir else default_data_dir()
    print(summary(d))
    ok = verify(d)
    print(json.dumps({**_totals(d), "ok": ok}))
    return 0 if ok else 1


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare corpora and token files")
    sub = p.add_subparsers(dest="data_command", metavar="<data command>")
    sub.required = True
    pp = sub.add_parser("prepare", help="read sources, train a BPE tokenizer, write token files + manifest",
                        description="Sources: " + ", ".join(["shakespeare", "python-stdlib", "python-docs",
                                    "linux-docs", "gcide", "kjv"]) + ", a .txt/.jsonl file or folder, hf:NAME[:split].")
    pp.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated (default: %(default)s)")
    pp.add_argument("--out", default=None, help="output folder (default: <cache>/data/default)")
    pp.add_argument("--vocab-size", type=int_at_least(257), default=8192,
                    help="BPE vocabulary size, >= 257 (default: %(default)s)")
    pp.add_argument("--max-bytes-per-source", type=int_at_least(1), default=None,
                    help="cap the text taken from each source")
    pp.add_argument("--tokenizer", default=None, help="use this tokenizer.json / HF tokenizer folder, no training")
    pp.add_argument("--val-fraction", type=number_in(0.0, 1.0, hi_open=True), default=0.05,
                    help="documents held out, in [0, 1) (default: %(default)s; 0: no validation split)")
    pp.add_argument("--encoding", default="utf-8",
                    help="text encoding of the files given by path (default: %(default)s; e.g. latin-1, cp1252)")
    pp.add_argument("--force", action="store_true", help="rebuild even if the same preparation exists")
    pp.set_defaults(func=_cmd_prepare)
    pi = sub.add_parser("info", help="print the manifest summary of a prepared folder and verify its files")
    pi.add_argument("dir", nargs="?", default=None)
    pi.set_defaults(func=_cmd_info)
