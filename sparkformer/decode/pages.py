"""Decode weights on transparent huge pages: one 2 MiB-aligned buffer, advised with ``madvise(MADV_HUGEPAGE)``.

Batch-1 decode streams every weight once per token, and with 4 KiB pages the core's page walks and TLB misses cost a
measurable share of that stream: moving the weights onto 2 MiB pages made the quantized matvecs 20-25% faster and the
bf16 ones 8-19% on one Zen 4 core with cold weights (benchmarks/quant_kernels.py's shapes, the kernel helper's
measurement of issue #14). PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` only covers single allocations of 2 MiB or more,
and a small model's matrices (SmolLM2: 0.3-1.8 MB each) are smaller, so the engine packs them: every storage its
weights live in is copied into one buffer and each tensor is re-pointed (``Tensor.set_``) at its copy, views
included, so the kernels see the same shapes, strides and aliasing as before. The old storages are freed when the
last reference goes; nothing is duplicated.

Where the kernel has THP off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never) or the call fails, the buffer
is ordinary memory: correct, just without the gain. ``SPARKFORMER_HUGE_PAGES=0`` skips the packing.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterable

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_ALIGN = 64
_packed_ranges: list[tuple[int, int]] = []  # [start, end) of the buffers made here: their tensors are not re-packed


def enabled() -> bool:
    return os.environ.get("SPARKFORMER_HUGE_PAGES", "1").strip().lower() not in ("0", "false", "no", "off")


def _advise_huge(addr: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):  # not Linux / no madvise
        return False


def _is_packed(ptr: int) -> bool:
    return any(a <= ptr < b for a, b in _packed_ranges)


def pack_on_huge_pages(tensors: Iterable[torch.Tensor]) -> dict:
    """Move the CPU storages of ``tensors`` into one huge-page buffer (in place: each tensor object is re-pointed).
    Returns {"bytes": bytes moved, "advised": whether madvise succeeded}."""
    groups: dict[int, tuple[torch.UntypedStorage, dict[int, torch.Tensor]]] = {}
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0 or t.requires_grad:
            continue  # a model's own parameters (an fp32 engine may read them in place) stay where they are
        st = t.untyped_storage()
        if _is_packed(st.data_ptr()):
            continue
        groups.setdefault(st.data_ptr(), (st, {}))[1][id(t)] = t
    total = sum(-(-st.nbytes() // _ALIGN) * _ALIGN for st, _ in groups.values())
    if not enabled() or total < HUGE_PAGE:
        return {"bytes": 0, "advised": False}
    raw = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)  # untouched until the copies below fault it in
    base = (-raw.data_ptr()) % HUGE_PAGE
    advised = _advise_huge(raw.data_ptr() + base, -(-total // HUGE_PAGE) * HUGE_PAGE)
    storage = raw.untyped_storage()
    off = base
    with torch.no_grad():
        for st, members in groups.values():
            n = st.nbytes()
            raw[off: off + n].copy_(torch.tensor([], dtype=torch.uint8).set_(st))
            for t in members.values():
                t.set_(storage, off // t.element_size() + t.storage_offset(), t.size(), t.stride())
            off += -(-n // _ALIGN) * _ALIGN
    _packed_ranges.append((raw.data_ptr(), raw.data_ptr() + raw.numel()))
    return {"bytes": total, "advised": advised}
