"""The one place that picks the kernel implementation: Triton on CUDA, torch elsewhere.

`SAEFORMER_KERNELS=auto|torch|triton` overrides the choice (read on every call); forcing
`triton` on CPU is how interpreter tests (`TRITON_INTERPRET=1`) run the Triton kernels.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

from saeformer.errors import UserError
from saeformer.kernels import torch_ops

ENV_VAR = "SAEFORMER_KERNELS"
TRITON_MODULE = "saeformer.kernels.triton_ops"
_CHOICES = ("auto", "torch", "triton")


def backend(device: torch.device) -> ModuleType:
    """The module (providing topk, sparse_decode, encode_topk) for tensors on `device`."""
    choice = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise UserError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return torch_ops
    return _triton_or_torch()


@functools.cache
def _triton_or_torch() -> ModuleType:
    """Import the Triton kernels once; if that fails, warn once and use the torch kernels."""
    try:
        return importlib.import_module(TRITON_MODULE)
    except ImportError as err:
        warnings.warn(f"Triton kernels unavailable ({err}); using torch kernels", stacklevel=3)
        return torch_ops
