"""Where a model runs and at what precision: the ``device`` (and ``dtype``) settings of the
annotators that load one (SAM, transformers).

``auto`` means the GPU when one is visible, else the CPU. torch is imported only when a device
is resolved, so settings can be checked on a machine without it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from settings import ConfigError

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def valid_device(value: str, extra: tuple[str, ...] = ()) -> bool:
    """True for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` and the names in ``extra`` (e.g. mps)."""
    return _DEVICE.fullmatch(value) is not None or value in extra


def device_name(setting: str) -> str:
    """``auto`` as ``cuda`` when a GPU is visible, else ``cpu``; any other value unchanged."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(setting: str) -> torch.device:
    """The torch device of ``setting`` (``auto`` resolved); CUDA asked for on a machine without
    it is a ConfigError naming ``device``."""
    import torch

    name = device_name(setting)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was requested but is not available; use auto or cpu")
    return torch.device(name)


def dtype_name(setting: str, device: str) -> str:
    """``auto`` as bfloat16 on a GPU that supports it (else float16), float32 off the GPU; other
    values unchanged."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"
