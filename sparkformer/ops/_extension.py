"""Build, cache and load the C++ decode kernels (torch custom ops ``torch.ops.sparkformer.*``).

The sources in ``sparkformer/ops/csrc`` are compiled once per (torch version, sources, flags, CPU) and the
shared library is kept under ``sparkformer.paths.cache_dir("ext", <key>)``; later processes load it in
milliseconds. The kernels are compiled three times inside that one library (AVX-512, AVX2+FMA, plain C++;
the quantized ones a fourth time, AVX-512 with VNNI)
and the best one the CPU supports is picked when it loads, so no ``-march=native`` is used. The key still
includes the CPU's feature flags, so a cache directory shared between machines never hands one CPU a
build made on another.

If the build fails, or no C++ compiler is present, or ``SPARKFORMER_DISABLE_EXT=1`` is set, ``available()``
returns False and the ``*_decode`` wrappers use their pure-PyTorch fast path (a warning says so, once).
With ``SPARKFORMER_REQUIRE_EXT=1`` (CI) a failed or impossible build is an error instead: ``available()`` / ``load()``
raise ``ExtensionUnavailable`` with the build's message, on every call. An explicit ``SPARKFORMER_DISABLE_EXT=1``
still disables (deliberate, so not an error).

    python -m sparkformer.ops._extension      # build now (or load the cached build) and print what it found
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from sparkformer.paths import cache_dir

NAME = "sparkformer_decode_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "quant_ops.cpp", "quant_sparse_ops.cpp", "sparse_ops.cpp", "step_ops.cpp",
           "kernels_avx512vnni.cpp", "kernels_avx512.cpp", "kernels_avx2.cpp", "kernels_scalar.cpp")
# every header in csrc/ goes into the build key (a header missing from a hand-kept list left a stale build in place)
HEADERS = tuple(sorted(p.name for p in CSRC.glob("*.h")))
# -fopenmp at compile time only: at::parallel_for is an OpenMP region in the header; the runtime is the
# libgomp torch already loaded (linking another copy would give two thread pools).
CFLAGS = ("-O3", "-fopenmp", "-DNDEBUG", "-Wno-unused-function")
# CPU features that change which kernels run or how they are compiled.
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c",
              "bmi2")

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "path": None}


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded while ``SPARKFORMER_REQUIRE_EXT`` is set."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def disabled() -> bool:
    """True when ``SPARKFORMER_DISABLE_EXT`` is set to a true value (1/true/yes/on)."""
    return _flag("SPARKFORMER_DISABLE_EXT")


def required() -> bool:
    """True when ``SPARKFORMER_REQUIRE_EXT`` is set to a true value: a failed build raises instead of falling back."""
    return _flag("SPARKFORMER_REQUIRE_EXT")


def cpu_flags() -> tuple[str, ...]:
    """The relevant CPU feature flags of this machine (from /proc/cpuinfo; empty where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(fl for fl in _CPU_FLAGS if fl in have)
    except OSError:
        pass
    return ()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return "?"


def build_key() -> str:
    """Cache key: torch version + a hash of the sources, flags, compiler, platform and CPU features."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    cxx = _compiler() or "none"
    for part in (CFLAGS, (cxx, _compiler_version(cxx)), (sys.platform, platform.machine()), cpu_flags()):
        h.update(repr(part).encode())
    return f"torch{torch.__version__}-{h.hexdigest()[:16]}"


def build_dir() -> Path:
    return cache_dir("ext", build_key())


def _build(verbose: bool = False) -> tuple[Path, bool]:
    """Return (path of the built library, whether this call loaded it). Builds at most once per key."""
    final = build_dir() / f"{NAME}.so"
    if final.exists():
        return final, False
    with open(final.parent / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one builder per key; the others wait and reuse its result
        if final.exists():
            return final, False
        if _compiler() is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        from torch.utils import cpp_extension

        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=final.parent))
        try:
            # load() compiles with ninja and loads the library into this process
            cpp_extension.load(
                name=NAME,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_include_paths=[str(CSRC)],
                build_directory=str(tmp),
                is_python_module=False,
                verbose=verbose,
            )
            os.replace(tmp / f"{NAME}.so", final)  # atomic: other processes only ever see a complete file
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, True


def _register_fakes() -> None:
    """Shape functions so torch.compile / FakeTensor can trace through the ops."""
    lib = "sparkformer::"

    @torch.library.register_fake(lib + "spark_ffn_decode")
    def _(x, k1, k2, v, fraction, workspace=None, act="gelu_tanh"):
        return x.new_empty(v.shape[1]), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "spark_ffn_prefill")
    def _(x2, p, k2, v, fraction, block=256):
        return x2.new_empty(x2.shape[0], v.shape[1], dtype=torch.float32), x2.new_empty(x2.shape[0], dtype=torch.long)

    @torch.library.register_fake(lib + "spark_attn_decode")
    def _(q, kp, kr, v, length, k, scale, window=None, softcap=None, workspace=None):
        h = q.shape[0]
        return q.new_empty(h, v.shape[2]), q.new_empty(h, dtype=torch.long), q.new_empty(h, dtype=torch.bool)

    @torch.library.register_fake(lib + "geglu_decode")
    def _(x, w_gate, w_up, w_down_t, workspace=None, act="gelu_tanh"):
        return x.new_empty(w_down_t.shape[1])

    @torch.library.register_fake(lib + "gated_ffn_gather")
    def _(x, gate_up, w_down_t, idx, act):
        return x.new_empty(w_down_t.shape[1])

    @torch.library.register_fake(lib + "gated_ffn_gather_verify")
    def _(x, gate_up, w_down_t, idx, act, weights, threshold):
        return x.new_empty(w_down_t.shape[1]), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "cats_ffn_decode")
    def _(x, w_gate, w_up, w_down_t, threshold, act):
        return x.new_empty(w_down_t.shape[1]), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "sparse_input_matvec")
    def _(w_t, x, threshold):
        return x.new_empty(w_t.shape[1]), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "lowrank_routed_ffn")
    def _(x, A, B, f, act, gate_up, w_down_t, verify_weights=None, verify_threshold=0.0, score_act=None):
        return x.new_empty(w_down_t.shape[1]), x.new_empty((), dtype=torch.long), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "teal_ffn_decode")
    def _(x, gate_up_t, w_down_t, t_in, t_down, act):
        return x.new_empty(w_down_t.shape[1]), x.new_empty((), dtype=torch.long), x.new_empty((), dtype=torch.long)

    @torch.library.register_fake(lib + "dense_attn_decode")
    def _(q, k, v, length, scale, window=None, softcap=None, workspace=None):
        return q.new_empty(q.shape[0], v.shape[2])

    @torch.library.register_fake(lib + "matvec")
    def _(w, x):
        return x.new_empty(w.shape[0])


def _summary(msg: str, limit: int = 400) -> str:
    """The informative part of a build error: compiler 'error:' lines if any, else the first line."""
    lines = [ln.strip() for ln in msg.splitlines() if "error" in ln.lower() and "ninja" not in ln.lower()]
    text = " | ".join(lines[1:4] if len(lines) > 1 else lines) or msg.splitlines()[0]
    return text[:limit]


def _already_registered() -> bool:
    try:
        torch.ops.sparkformer.spark_ffn_decode.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _unavailable() -> ExtensionUnavailable:
    return ExtensionUnavailable(
        f"SPARKFORMER_REQUIRE_EXT is set but the C++ decode kernels could not be built or loaded: "
        f"{_summary(_state['error'])}\n\nFull message:\n{_state['error']}")


def _raise_if_required() -> None:
    if _state["error"] is not None and required():
        raise _unavailable()


def load(verbose: bool = False) -> bool:
    """Build (once, cached) and load the extension. Returns True when the C++ ops are usable.

    The outcome is decided on the first call in a process (``SPARKFORMER_DISABLE_EXT`` is read then). Raises
    ``ExtensionUnavailable`` instead of returning False when ``SPARKFORMER_REQUIRE_EXT`` is set and the build failed."""
    if _state["tried"]:  # lock-free fast path, also what torch.compile traces
        if not _state["ok"]:
            _raise_if_required()
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            if not _state["ok"]:
                _raise_if_required()
            return _state["ok"]
        _state["tried"] = True
        if disabled():
            return False
        try:
            if not _already_registered():
                path, loaded = _build(verbose)
                if not loaded:
                    torch.ops.load_library(str(path))
                _state["path"] = path
                _register_fakes()
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 -- any failure means: use the pure-torch path (unless required)
            _state["error"] = f"{type(e).__name__}: {e}"
            if required():
                raise _unavailable() from e
            warnings.warn(
                "sparkformer: the C++ decode kernels could not be built or loaded "
                f"({_summary(_state['error'])}); using the slower pure-PyTorch fallback. "
                "Details: sparkformer.ops._extension.error()",
                RuntimeWarning,
                stacklevel=2,
            )
        return _state["ok"]


def available() -> bool:
    """True when the C++ decode ops are loaded (building them on first use) and not disabled by env."""
    return load()


def error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was never tried)."""
    return _state["error"]


def isa() -> str:
    """The kernel instruction set in use: 'avx512vnni', 'avx512', 'avx2' or 'scalar' ('none' without the extension)."""
    return torch.ops.sparkformer._set_isa("") if available() else "none"


def set_isa(name: str) -> str:
    """Narrow the kernels to 'avx512vnni' | 'avx512' | 'avx2' | 'scalar', or 'auto' for the best the CPU has (for tests
    and benchmarks). Returns the ISA now in use. ``SPARKFORMER_ISA`` sets the same at load time."""
    if not available():
        raise RuntimeError("sparkformer C++ extension unavailable: " + str(error()))
    return torch.ops.sparkformer._set_isa(name)


def supported_isas(names: tuple[str, ...] = ("avx512vnni", "avx512", "avx2", "scalar")) -> list[str]:
    """The ISAs among ``names`` this CPU can run (each tried with ``set_isa``; 'auto' is restored after)."""
    have = []
    for name in names:
        try:
            set_isa(name)
            have.append(name)
        except RuntimeError:
            pass
    set_isa("auto")
    return have


def info() -> dict:
    return {
        "available": available(),
        "disabled_by_env": disabled(),
        "required_by_env": required(),
        "isa": isa(),
        "cpu_flags": list(cpu_flags()),
        "path": str(_state["path"]) if _state["path"] else None,
        "error": error(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    import json
    import time

    t0 = time.perf_counter()
    ok = load(verbose="-v" in sys.argv)
    print(json.dumps({**info(), "load_s": round(time.perf_counter() - t0, 2)}, indent=1))
    sys.exit(0 if ok or disabled() else 1)
