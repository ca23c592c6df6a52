"""Triton kernels under the CPU interpreter: these tests need a pytest process of their own.

`TRITON_INTERPRET` is read when a kernel is decorated and `SAEFORMER_KERNELS` routes the
public API, so both must be set before anything imports the kernels; setting them here would
leak into the rest of a combined run. Without them (or without triton), the interpreter tests
skip with the command that runs them.
"""

from __future__ import annotations

import importlib
import os
import random
from types import ModuleType

import pytest

REQUIRED_ENV = {"TRITON_INTERPRET": "1", "SAEFORMER_KERNELS": "triton"}
RUN_HINT = "TRITON_INTERPRET=1 SAEFORMER_KERNELS=triton python -m pytest tests/triton"


@pytest.fixture(scope="session")
def ops() -> ModuleType:
    """`saeformer.kernels.triton_ops` under the interpreter, or a skip saying how to run."""
    missing = [f"{k}={v}" for k, v in REQUIRED_ENV.items() if os.environ.get(k) != v]
    if missing:
        pytest.skip(f"needs {' '.join(missing)} before import; run: {RUN_HINT}")
    pytest.importorskip("triton")
    return importlib.import_module("saeformer.kernels.triton_ops")


@pytest.fixture(autouse=True)
def poison_outputs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every kernel output buffer with NaN (floats) or the minimum (ints) before launch."""
    if "ops" not in request.fixturenames:
        return
    request.getfixturevalue("ops")  # skips first when the interpreter is not set up
    import torch

    from saeformer.kernels import triton_util

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(triton_util, "empty", poisoned)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (SAEFORMER_TEST_SEED replays one), also set as torch's seed."""
    import torch

    value = int(os.environ.get("SAEFORMER_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    return value
