"""Devices and dtypes, resolved in one place for every command (training goes through Lightning)."""

from __future__ import annotations

from .errors import CsmcirError

__all__ = ["resolve_device", "resolve_dtype"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_device(device: str = "auto"):
    """``auto`` (the first CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns a ``torch.device``. Asking for CUDA where there is none is a :class:`CsmcirError`.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CsmcirError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CsmcirError(f"device {device!r} asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return dev


def resolve_dtype(dtype: str, device="cpu"):
    """``auto`` (bfloat16 on a GPU, float32 on a CPU), ``float32``, ``bfloat16``, ``float16`` (and
    the short forms ``fp32``, ``bf16``, ``fp16``) -> a ``torch.dtype``."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise CsmcirError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return getattr(torch, _DTYPES[dtype])
