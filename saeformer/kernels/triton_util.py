"""Helpers shared by the Triton kernel modules: availability check and output buffers."""

from __future__ import annotations

import torch
import triton
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


def require_runnable() -> None:
    """Raise ImportError, which `dispatch` turns into the torch fallback, if no kernel can run."""
    if not (interpreting() or torch.cuda.is_available()):
        raise ImportError("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on CPU")


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised kernel output buffer; tests patch this to poison every output."""
    return torch.empty(shape, dtype=dtype, device=device)
