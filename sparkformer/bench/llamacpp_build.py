"""Build llama.cpp's ``llama-bench``, ``llama-quantize`` and ``llama-simple`` from source into the cache dir
(``make llamacpp``).

The source is the ``llama-cpp-python`` source package on PyPI, which vendors llama.cpp (``vendor/llama.cpp``); it is
fetched with pip, unpacked under ``cache_dir("llamacpp")`` and built with CMake: Release, native CPU flags (AVX2 /
AVX-512 as a user's own build gets them), static llama libraries, only those tool targets (~8-10 minutes on 2 cores).
The binaries land in ``cache_dir("llamacpp", "bin")`` with ``build.json`` beside them: the package version, the
llama.cpp commit, the compiler, the CMake flags and the CPU the build was tuned for. A second run reuses the build.

    python -m sparkformer.bench.llamacpp_build [--sdist FILE] [--spec 'llama-cpp-python==0.3.36'] [--jobs 2] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from sparkformer.bench.common import cpu_model
from sparkformer.paths import cache_dir

DEFAULT_SPEC = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-simple")  # simple: greedy text, the same-function check (tests)
MIN_CMAKE = (3, 14)
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",  # configured, not built: only TARGETS are
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)


def bin_dir() -> Path:
    return cache_dir("llamacpp", "bin")


def built_binary(name: str = "llama-bench") -> Path | None:
    """The binary ``make llamacpp`` built, or None when it has not been built on this machine."""
    path = bin_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build_info() -> dict | None:
    """What ``build.json`` recorded about the built binaries (version, commit, flags), or None."""
    path = bin_dir() / "build.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run(cmd: list[str], log: Path, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def fetch_sdist(spec: str, dest: Path, log: Path) -> Path:
    """``pip download`` the source package (no wheels, no deps) into ``dest``; reuse one already there."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    pinned = re.fullmatch(r"llama-cpp-python==([\w.]+)", spec.replace(" ", ""))
    if pinned:
        have = [p for p in have if p.name == f"llama_cpp_python-{pinned.group(1)}.tar.gz"]
    if have:
        return have[-1]
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(dest)], log)
    have = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not have:
        raise RuntimeError(f"pip download {spec!r} left no llama_cpp_python-*.tar.gz in {dest}")
    return have[-1]


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack the source package under ``dest`` (once) and return its vendored llama.cpp folder."""
    name = sdist.name.removesuffix(".tar.gz")
    root = dest / name
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
    src = root / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt: not a llama-cpp-python source package?")
    return src


def llama_commit(src: Path) -> str | None:
    """The vendored llama.cpp commit: the submodule HEAD that the source package keeps in ``.git/modules``."""
    gitfile = src / ".git"
    if gitfile.is_file():
        text = gitfile.read_text().strip()
        if text.startswith("gitdir:"):
            head = (src / text.split(":", 1)[1].strip()) / "HEAD"
            if head.is_file():
                value = head.read_text().strip()
                if re.fullmatch(r"[0-9a-f]{40}", value):
                    return value
    return None


def _version(cmd: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def find_cmake(log: Path) -> str:
    """A CMake >= 3.14: the one on PATH, else the one in this venv, else pip-install ``cmake`` into the venv."""
    candidates = [shutil.which("cmake"), str(Path(sys.executable).parent / "cmake")]
    for c in candidates:
        if c and Path(c).is_file() and (_version([c]) or (0,)) >= MIN_CMAKE:
            return c
    _run([sys.executable, "-m", "pip", "install", "-q", "cmake>=3.18"], log)
    c = str(Path(sys.executable).parent / "cmake")
    if not Path(c).is_file():
        raise RuntimeError("no cmake >= 3.14 found and `pip install cmake` gave none: apt-get install cmake")
    return c


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return cxx


def _tool_version(exe: Path) -> str | None:
    """``llama-bench --version``'s first line, e.g. ``version: 0.5.0-dev (build 1, commit 0c1e570)``."""
    try:
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return next((ln.strip() for ln in lines if ln.startswith("version")), lines[0] if lines else None)


def _compile_flags(build_dir: Path) -> str | None:
    """The C flags ggml's CPU backend was compiled with (``-march=native`` and the rest): what native picked."""
    for f in build_dir.glob("ggml/src/**/ggml-cpu.dir/flags.make"):
        for line in f.read_text().splitlines():
            if line.startswith("C_FLAGS"):
                return line.split("=", 1)[1].strip()
    return None


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if re.match(r"(avx|amx|fma|f16c|sse4|vnni)", f))
    except OSError:
        pass
    return []


def build(spec: str = DEFAULT_SPEC, sdist: str | Path | None = None, jobs: int = 2, force: bool = False,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """Fetch, configure and build; returns the ``llama-bench`` path. Reuses a finished build unless ``force``."""
    root = cache_dir("llamacpp")
    out = bin_dir()
    if not force and built_binary() and all((out / t).is_file() for t in TARGETS) and build_info():
        print(f"llama.cpp already built: {out} (pass --force to rebuild)")
        return out / "llama-bench"
    log = root / "build.log"
    log.write_text("")
    t0 = time.time()
    sdist_path = Path(sdist) if sdist else fetch_sdist(spec, root / "sdist", log)
    src = unpack(sdist_path, root / "src")
    cmake = find_cmake(log)
    build_dir = root / "build"
    flags = list(CMAKE_FLAGS) + list(extra_flags)
    _run([cmake, "-S", str(src), "-B", str(build_dir), *flags], log)
    _run([cmake, "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)], log)
    for t in TARGETS:
        shutil.copy2(build_dir / "bin" / t, out / t)
    info = {
        "source_package": sdist_path.name,
        "spec": None if sdist else spec,
        "llama_cpp_commit": llama_commit(src),
        "version": _tool_version(out / "llama-bench"),
        "cmake": ".".join(str(x) for x in (_version([cmake]) or ())),
        "cmake_flags": flags,
        "ggml_cpu_c_flags": _compile_flags(build_dir),
        "targets": list(TARGETS),
        "compiler": _compiler(),
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "build_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return out / "llama-bench"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=DEFAULT_SPEC, help=f"pip requirement for the source package ({DEFAULT_SPEC})")
    ap.add_argument("--sdist", default=None, help="a llama_cpp_python-*.tar.gz already on disk (skips pip download)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rebuild even when the binaries exist")
    ap.add_argument("--cmake-flag", action="append", default=[], help="extra -D flag, e.g. -DGGML_AVX512=OFF")
    args = ap.parse_args(argv)
    path = build(args.spec, args.sdist, args.jobs, args.force, tuple(args.cmake_flag))
    print(path)


if __name__ == "__main__":
    main()
