"""Checkpoint folders of a training run: write them atomically with checksums, find the newest intact one, load a
model from it, and lock the run folder.

A run folder holds ``checkpoints/step-NNNNNNN`` folders (``model.safetensors``, ``config.json``, ``tokenizer.json``,
``trainer_state.pt``, ``state.json``, ``checksums.json``), ``checkpoints/latest`` naming the newest complete one, and
``.lock`` while a training process uses it.

- Written atomically: every file goes into ``step-N.tmpPID``, is flushed to disk, ``checksums.json`` (size and
  sha256 of every other file) is written last, and the folder is renamed into place; old checkpoints are renamed
  away before they are deleted. So a folder under its final name is always complete, whenever a process is killed.
- Verified at load: ``verify_checkpoint`` compares every file with ``checksums.json`` (folders written before
  checksums existed: the safetensors header and size, the JSON files, the zip records of ``trainer_state.pt``). A
  run folder resolves to its newest *intact* checkpoint, naming each damaged newer one in a warning; a damaged
  checkpoint named explicitly is refused (``CheckpointDamaged``, naming it and the fallback).
- Loaded safely: safetensors headers are checked against the file size before anything is allocated, and
  ``trainer_state.pt`` is read with ``torch.load(weights_only=True)`` only.
- Locked: ``RunLock`` holds an exclusive lock on the run folder for a training process; a second one is refused,
  naming the holder's pid; a lock left by a process that died is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

from sparkformer.config import ModelConfig, read_json
from sparkformer.data import sha256_file

CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums.json"
CHECKSUM_FORMAT = "sparkformer-checksums/1"
LOCK = ".lock"
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is refused (the safetensors library's own limit)


class CheckpointDamaged(ValueError):
    """A checkpoint's files do not match what was written (truncated, overwritten, unreadable)."""


class RunLocked(ValueError):
    """Another process holds the run folder's lock."""


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- writing ---------------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _steps(ck: Path) -> list[Path]:
    """Complete step folders (state.json present, final names only), oldest first."""
    return sorted(p for p in ck.glob("step-*") if "." not in p.name and (p / "state.json").exists())


def remove_tree(path: Path) -> None:
    """Delete a folder so that no half-deleted copy is ever left under its name: rename it away first."""
    if not path.exists():
        return
    away = path.with_name(f".{path.name}.deleting{os.getpid()}")
    os.replace(path, away)
    shutil.rmtree(away, ignore_errors=True)


def clean_partial(out_dir: str | Path) -> list[str]:
    """Remove what killed writers left in ``checkpoints/`` (``*.tmpPID`` / ``.*.deletingPID`` / ``*.oldPID``); call
    it only while holding the run's lock. Returns the names removed."""
    ck = Path(out_dir) / CHECKPOINTS
    gone = []
    for p in list(ck.glob("step-*.*")) + list(ck.glob(".*.deleting*")) + list(ck.glob(".latest.tmp*")):
        gone.append(p.name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def commit_checkpoint(tmp: Path, final: Path, keep: int) -> Path:
    """Seal the folder ``tmp`` (every file written) as checkpoint ``final``: checksums, flush, rename into place,
    point ``latest`` at it, then delete all but the newest ``keep`` checkpoints."""
    files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != CHECKSUMS)
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (tmp / CHECKSUMS).write_text(json.dumps({"format": CHECKSUM_FORMAT, "files": sums}, indent=1) + "\n")
    for p in tmp.iterdir():
        _fsync_path(p)
    _fsync_path(tmp)
    old = None
    if final.exists():  # same step written twice: move the old one aside, never delete it first
        old = final.with_name(f".{final.name}.deleting{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    write_atomic(final.parent / "latest", final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for p in _steps(final.parent)[:-keep]:
        if p != final:
            remove_tree(p)
    return final


# ---- verifying -------------------------------------------------------------------------------------------------------
_VERIFIED: dict[str, tuple] = {}  # folder -> (name, size, mtime) of its files when last verified intact


def _fingerprint(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file before anything is allocated: a sane header
    length, valid JSON, and every tensor's byte range inside the file and equal to its dtype x shape."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path.name}: header claims {n} bytes, the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path.name}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header is not a mapping")
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(v) for v in t["data_offsets"])
            count = 1
            for d in t["shape"]:
                count *= int(d)
            nbytes = count * itemsize[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= lo <= hi or hi - lo != nbytes:
            raise ValueError(f"{path.name}: tensor {name!r} claims {nbytes} bytes in a range of {hi - lo}")
        end = max(end, hi)
    if 8 + n + end != size:
        raise ValueError(f"{path.name}: {size} bytes, the header describes {8 + n + end}")
    return header


def _verify_legacy(folder: Path) -> None:
    """A folder without checksums.json (written before they existed, or by hand): check what can be checked."""
    if not (folder / "model.safetensors").is_file():
        raise ValueError("model.safetensors is missing")
    safetensors_header(folder / "model.safetensors")
    for name in ("config.json", "state.json"):
        if (folder / name).exists():
            try:
                read_json(folder / name)
            except ValueError:
                raise ValueError(f"{name} is not valid JSON") from None
    ts = folder / "trainer_state.pt"
    if ts.exists():
        try:
            with zipfile.ZipFile(ts) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise ValueError("trainer_state.pt is not a readable torch file") from None
        if bad is not None:
            raise ValueError(f"trainer_state.pt: record {bad} fails its CRC")


def verify_checkpoint(folder: str | Path) -> None:
    """Raise ``CheckpointDamaged`` (one line naming the folder and the first bad file) unless every file of the
    checkpoint matches ``checksums.json`` (see the module doc for older folders)."""
    folder = Path(folder)
    fp = _fingerprint(folder)
    if _VERIFIED.get(str(folder)) == fp:
        return
    try:
        sums_path = folder / CHECKSUMS
        if not sums_path.exists():
            _verify_legacy(folder)
        else:
            try:
                sums = read_json(sums_path)["files"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{CHECKSUMS} is unreadable") from None
            for name, want in sums.items():
                p = folder / name
                if not p.is_file():
                    raise ValueError(f"{name} is missing")
                size = p.stat().st_size
                if size != want["bytes"]:
                    raise ValueError(f"{name} has {size} bytes, {want['bytes']} when it was saved")
                if sha256_file(p) != want["sha256"]:
                    raise ValueError(f"{name} differs from the checksum written when it was saved")
    except (ValueError, OSError) as e:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {e}") from None
    _VERIFIED[str(folder)] = fp


# ---- finding ---------------------------------------------------------------------------------------------------------
def _candidates(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, newest first: the one ``latest`` names, then the lower steps."""
    ck = out_dir / CHECKPOINTS
    steps = _steps(ck)
    ptr = ck / "latest"
    if ptr.exists():
        try:
            named = ck / ptr.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named in steps:
            return [named] + [p for p in reversed(steps) if p.name < named.name]
    return list(reversed(steps))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (``checkpoints/latest``, else the highest ``step-*``), without
    verifying its files (``intact_checkpoint`` does)."""
    cands = _candidates(Path(out_dir))
    return cands[0] if cands else None


def intact_checkpoint(out_dir: str | Path, warn: Callable[[str], None] | None = _warn) -> Path | None:
    """The newest checkpoint of a run folder whose files verify; each damaged newer one is named in one warning
    line. None when the run has no checkpoint; ``CheckpointDamaged`` when it has only damaged ones."""
    damaged = []
    for cand in _candidates(Path(out_dir)):
        try:
            verify_checkpoint(cand)
        except CheckpointDamaged as e:
            damaged.append(str(e))
            continue
        if damaged and warn is not None:
            for d in damaged:
                warn(f"warning: {d}; falling back to {cand.name}, the newest intact checkpoint")
        return cand
    if damaged:
        raise CheckpointDamaged("; ".join(damaged) + " (no intact checkpoint left in this run)")
    return None


def is_checkpoint_folder(path: Path) -> bool:
    return any((path / f).is_file() for f in ("model.safetensors", "state.json", CHECKSUMS))


def resolve_checkpoint(path: str | Path, warn: Callable[[str], None] | None = _warn) -> Path:
    """A checkpoint folder (refused when damaged), or a run folder (its newest intact checkpoint, with a warning
    naming each damaged newer one)."""
    path = Path(path).expanduser()
    if is_checkpoint_folder(path):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            run = path.parent.parent if path.parent.name == CHECKPOINTS else None
            older = [p for p in _candidates(run) if p.name < path.name] if run is not None else []
            hint = (f"; give the run folder {run} to use the newest intact checkpoint (it tries {older[0].name} next)"
                    if older else "")
            raise CheckpointDamaged(f"{e}{hint}") from None
        return path
    found = intact_checkpoint(path, warn)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (model.safetensors) nor a run folder with "
                                f"{CHECKPOINTS}/step-*; train first or give the checkpoint folder")
    return found


# ---- loading ---------------------------------------------------------------------------------------------------------
def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, its header checked first (see ``safetensors_header``)."""
    from safetensors.torch import load_file

    try:
        safetensors_header(path)
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError is not importable under one name across versions
        raise CheckpointDamaged(f"{path}: cannot be read: {e}") from None


def load_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` (optimizer and RNG state), read with ``weights_only=True`` only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - never pass on torch's advice to load unsafely
        raise CheckpointDamaged(f"{path}: cannot be read as saved tensors ({type(e).__name__})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, info)``: the SparkLM of a checkpoint (or run folder: its newest intact checkpoint) and its
    config.json contents."""
    from sparkformer.model import SparkLM

    path = resolve_checkpoint(path)
    info = read_json(path / "config.json")
    info["path"] = str(path)
    model = SparkLM(ModelConfig.from_dict(info["model"]))
    model.load_state_dict(load_safetensors(path / "model.safetensors"))
    return model.to(device), info


# ---- the run folder's lock -------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``<folder>/.lock``, which records the holder's pid, host,
    start time and command). The kernel drops the lock when its process dies, so a lock left by a killed process
    is taken over (and reported); one held by a live process is refused with ``RunLocked``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.took_over: dict | None = None  # the record of a dead holder whose lock this one took over

    def _read(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                h = self._read()
                who = f"pid {h.get('pid', '?')}" + (f" on {h['host']}" if h.get("host") else "")
                since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(h["time"])) if h.get("time") else ""
                raise RunLocked(f"{self.folder} is in use by another training process ({who}{since}: "
                                f"{h.get('command', '?')}); wait for it to finish or stop it, or choose another "
                                "out_dir") from None
            except OSError as e:
                os.close(fd)
                raise OSError(f"cannot lock {self.path} ({e.strerror}); the file system may not support locks: "
                              "choose an out_dir on a local disk") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: lock the new one
                os.close(fd)
                continue
            prev = self._read()
            if prev.get("pid") not in (None, os.getpid()) and prev.get("host") in (None, socket.gethostname()):
                self.took_over = prev
                state = "no longer running" if not _alive(int(prev["pid"])) else "not holding it"
                _warn(f"note: took over the lock of {self.folder} left by pid {prev['pid']} ({state})")
            rec = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                   "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "python"}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(rec) + "\n").encode())
            self.fd = fd
            return self
        raise RunLocked(f"{self.folder}: could not take the lock (the lock file keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
