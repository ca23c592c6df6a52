"""Crash injection for the reliability tests: SIGKILL at a named point of a write."""

from __future__ import annotations

import os
import signal


def crash_point(name: str, step: int) -> None:
    """SIGKILL this process when SAEFORMER_CRASH_AT is `name@step` (and RANK matches
    SAEFORMER_CRASH_RANK, when that is set)."""
    rank = os.environ.get("SAEFORMER_CRASH_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get("SAEFORMER_CRASH_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
