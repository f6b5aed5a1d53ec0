import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and far slower with two on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _extension_isas() -> list[str]:
    """The kernel instruction sets this CPU can run (empty without the C++ extension)."""
    from sparkformer.ops import _extension

    if not _extension.available():
        return []
    have = []
    for name in ("avx512", "avx2", "scalar"):
        try:
            _extension.set_isa(name)
            have.append(name)
        except RuntimeError:
            pass
    _extension.set_isa("auto")
    return have


@pytest.fixture(params=_extension_isas() or ["none"])
def isa(request):
    """Run a test once per kernel ISA the CPU has (AVX-512, AVX2, scalar), then restore the automatic choice."""
    from sparkformer.ops import _extension

    if request.param == "none":
        pytest.skip("C++ extension unavailable")
    _extension.set_isa(request.param)
    yield request.param
    _extension.set_isa("auto")
