"""Checkpoints: weights as safetensors, training state beside them, written atomically.

    OUTPUT/checkpoints/step-00000500/model.safetensors   the model (loadable alone)
                                    /state.pt            optimizer, scheduler, step, data position, RNG
                                    /config.yaml         the resolved config
    OUTPUT/checkpoints/latest                            name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically after that, so a kill at any moment leaves the previous
checkpoint usable.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from trainer.config import TrainerConfig, save_config
from trainer.model import load_weights


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, position: dict[str, Any], config: TrainerConfig, keep: int,
         extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` and keep the newest ``keep`` ones."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data": position, "rng": _rng_state(), **(extra or {})}, tmp / "state.pt")
    save_config(config, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, if any."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None) -> dict[str, Any]:
    """Restore weights (and optimizer/scheduler if given); returns the saved state."""
    load_weights(model, path / "model.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
