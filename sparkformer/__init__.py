"""sparkformer: activation-sparse, modular transformer LMs (Spark Transformer + configurable bricks)."""

__version__ = "0.1.0"

from sparkformer.config import ModelConfig, get_preset  # noqa: E402

__all__ = ["ModelConfig", "get_preset", "__version__"]
