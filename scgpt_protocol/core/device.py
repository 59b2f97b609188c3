"""Device selection and mixed precision.

``precision`` (embedding, prediction, training) is one of :data:`PRECISIONS`:

- ``"auto"``: bf16 autocast on CPUs with native bf16 matrix units (AVX512-BF16 or AMX-BF16; elsewhere a
  bf16 matmul is emulated and far slower than fp32, so fp32), bf16 on Ampere and newer GPUs, fp16 with a
  GradScaler for training on older GPUs (Colab's T4, V100), fp32 on Apple MPS;
- ``"fp32"``: no autocast (what the parity tests run);
- ``"bf16"`` / ``"fp16"``: autocast to that dtype on any device (fp16 training gets a GradScaler).

Weights stay fp32 in every case; autocast runs the matrix products (linear layers, attention) in the
lower precision and keeps LayerNorm, softmax and the loss in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from typing import Any, Iterator, Literal

import torch

__all__ = ["PRECISIONS", "Precision", "resolve_device", "resolve_precision", "precision_dtype",
    "cpu_has_native_bf16", "autocast", "amp_dtype", "PeakMemory"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: the values of every ``precision`` parameter
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: x86 AVX512-BF16 or AMX-BF16.

    Asks torch (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``, torch >= 2.3) and
    falls back to the flags of ``/proc/cpuinfo``. Without these units (AVX2-only x86, e.g. AMD Zen 3;
    Apple silicon) PyTorch emulates bf16 matmuls, tens of times slower than fp32, so ``auto`` keeps fp32.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        if probe is not None:
            try:
                if probe():
                    return True
            except RuntimeError:
                pass
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        msg = f"precision {precision!r} is not one of {list(PRECISIONS)}; use 'auto' unless you need another."
        raise ValueError(msg)
    return precision


def resolve_precision(precision: str = "auto", device: str | torch.device = "cpu") -> str:
    """The precision ``"fp32"``, ``"bf16"`` or ``"fp16"`` that ``precision`` means on ``device``.

    ``"auto"``: bf16 on CPUs with :func:`cpu_has_native_bf16` and on CUDA GPUs of compute capability
    >= 8 (Ampere, Hopper...), fp16 on older CUDA GPUs, fp32 elsewhere (other CPUs, MPS).
    """
    _check_precision(precision)
    if precision != "auto":
        return precision
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type == "cuda":
        return "bf16" if amp_dtype(device) == torch.bfloat16 else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def precision_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32, no autocast)."""
    return _DTYPES[resolve_precision(precision, device)]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "auto", *, enabled: bool = True) -> Iterator[None]:
    """Autocast to the dtype that ``precision`` resolves to on ``device`` (:func:`resolve_precision`).

    ``fp32`` (or ``enabled=False``) is a no-op. CPU, CUDA and MPS are supported by ``torch.autocast``.
    """
    dtype = precision_dtype(precision, device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
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
