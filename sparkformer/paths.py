"""Where sparkformer keeps generated files (prepared corpora, token files, converted models, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$SPARKFORMER_CACHE`` (default ``~/.cache/sparkformer``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("SPARKFORMER_CACHE", Path.home() / ".cache" / "sparkformer")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
