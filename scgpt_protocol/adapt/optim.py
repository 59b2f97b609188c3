"""The fine-tuning optimiser: AdamW, in PyTorch's fused implementation where it exists.

The fused kernel makes one pass over each parameter, its gradient and its two moments, where the default
(for-loop) implementation makes about ten, each over memory: on the full model that is the 60,697 x 512
gene-embedding table, whose gradient and moments are dense. The update is the same AdamW update (the recipe's
optimiser is unchanged: Adam, as weight decay defaults to 0); it agrees with the for-loop one to rounding.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..core.params import published_adam_eps

__all__ = ["make_optimizer", "adam_eps", "FUSED_DEVICES"]

#: devices whose parameters get the fused AdamW kernel (the CPU one from torch 2.4)
FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(trainable: Iterable[torch.nn.Parameter], *, lr: float, eps: float, device: torch.device,
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over ``trainable``, fused on :data:`FUSED_DEVICES` where this torch has the kernel.

    Parameters
    ----------
    trainable
        The parameters to optimise (all on ``device``).
    lr, eps, weight_decay
        AdamW's settings (weight decay 0: Adam).
    device
        Where the parameters are; elsewhere than :data:`FUSED_DEVICES` the for-loop implementation runs.
    """
    trainable = list(trainable)
    if device.type in FUSED_DEVICES:
        try:
            return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, eps=eps, fused=True)
        except RuntimeError:  # a torch without the fused kernel for this device (CPU before 2.4)
            pass
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, eps=eps)


def adam_eps(amp: bool, eps: float | None = None) -> float:
    """Adam's eps: ``eps`` when given, else as the official fine-tuning loop sets it: 1e-4 whenever ``amp``
    is on, on every device (so a result does not depend on the GPU generation or on running on the CPU),
    else PyTorch's 1e-8 (:func:`~scgpt_protocol.core.params.published_adam_eps`)."""
    if eps is not None:
        return float(eps)
    return published_adam_eps(amp)
