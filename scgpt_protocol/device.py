"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch

__all__ = ["resolve_device", "autocast", "amp_dtype", "PeakMemory"]


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


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that run it natively (Ampere and newer), float16 before (Colab's T4, V100)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision on GPU (:func:`amp_dtype`); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=amp_dtype(device)):
        yield


class PeakMemory:
    """Peak memory of the work inside a ``with`` block, in bytes (``.peak``).

    On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``). Elsewhere: the process's
    resident memory, sampled every ``interval`` seconds, above its level at the start.
    """

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop: Any = None
        self._thread: Any = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):  # not Linux: the process's lifetime peak instead
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import threading

        self._base = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._rss() - self._base)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)
