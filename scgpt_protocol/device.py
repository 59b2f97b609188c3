"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["resolve_device", "autocast"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"`` into the best available device: CUDA, then Apple MPS, then CPU.

    Any other value is passed to :class:`torch.device`; asking for CUDA on a machine without it
    is an error that says so.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        msg = f"device {device!r} is not a valid torch device ({err}); use 'auto', 'cpu', 'cuda' or 'mps'."
        raise ValueError(msg) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} was requested but CUDA is not available here; use device='auto' or 'cpu'."
        raise ValueError(msg)
    return resolved


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision on GPU (bfloat16 where supported, else float16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        yield
        return
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield
