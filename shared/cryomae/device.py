"""Choosing the torch device and the autocast context that goes with it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

AUTOCAST_ENV = "CRYOMAE_AUTOCAST"  # "bf16" (the default) or "off": full float32 on CUDA too (the GPU check's switch)
AUTOCAST_VALUES = ("bf16", "off")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``: bf16 on CUDA unless ``CRYOMAE_AUTOCAST=off``; None (float32) on the CPU,
    where bf16 matmuls are slower, not faster. An unknown ``CRYOMAE_AUTOCAST`` value is a ValueError."""
    value = os.environ.get(AUTOCAST_ENV, "bf16").strip().lower()
    if value not in AUTOCAST_VALUES:
        raise ValueError(f"{AUTOCAST_ENV}={value!r}: choose one of {', '.join(AUTOCAST_VALUES)}")
    if device.type != "cuda" or value == "off":
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (``autocast_dtype``); full float32 on the CPU or with ``CRYOMAE_AUTOCAST=off``."""
    dtype = autocast_dtype(device)
    if dtype is not None:
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield
