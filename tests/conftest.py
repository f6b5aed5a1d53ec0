import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engine builds in tests quantize tiny random matrices: keep them out of the user's on-disk cache (test_quant_cache
# turns it on against a temporary folder).
os.environ.setdefault("SPARKFORMER_QUANT_CACHE", "0")

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


_EXT_REQUIRED_ERROR: list[str] = []  # why the extension is missing although SPARKFORMER_REQUIRE_EXT is set


def _extension_isas() -> list[str]:
    """The kernel instruction sets this CPU can run (empty without the C++ extension)."""
    from sparkformer.ops import _extension

    try:
        if not _extension.available():
            return []
    except _extension.ExtensionUnavailable as e:  # SPARKFORMER_REQUIRE_EXT=1: reported by pytest_sessionstart
        _EXT_REQUIRED_ERROR.append(str(e))
        return []
    return _extension.supported_isas(("avx512", "avx2", "scalar"))


def pytest_sessionstart(session):
    """With SPARKFORMER_REQUIRE_EXT=1 (CI) a missing C++ extension fails the run instead of skipping its tests."""
    if _EXT_REQUIRED_ERROR:
        pytest.exit(_EXT_REQUIRED_ERROR[0], returncode=1)


def use_isa(name: str):
    """Generator body of an ISA fixture: select ``name`` for the test ("none": skip, or fail when the extension is
    required), then restore the automatic choice."""
    from sparkformer.ops import _extension

    if name == "none":
        if _extension.required() and not _extension.disabled():
            pytest.fail("C++ extension unavailable although SPARKFORMER_REQUIRE_EXT is set")
        pytest.skip("C++ extension unavailable")
    _extension.set_isa(name)
    yield name
    _extension.set_isa("auto")


@pytest.fixture(params=_extension_isas() or ["none"])
def isa(request):
    """Run a test once per kernel ISA the CPU has (AVX-512, AVX2, scalar), then restore the automatic choice."""
    yield from use_isa(request.param)
