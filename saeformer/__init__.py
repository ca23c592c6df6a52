"""saeformer: pretrain Transformers with TopK sparse bottlenecks, interpretable by construction."""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedRun", "load_run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the run loader lazily, so `import saeformer.errors` stays light."""
    if name in __all__:
        from saeformer import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'saeformer' has no attribute {name!r}")
