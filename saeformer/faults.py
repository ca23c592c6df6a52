"""Crash injection for the reliability tests: SIGKILL at a named point of a write."""

from __future__ import annotations

import os
import signal


def crash_point(name: str, step: int) -> None:
    """Kill this process with SIGKILL here when SAEFORMER_CRASH_AT equals `name@step`."""
    if os.environ.get("SAEFORMER_CRASH_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
