"""Checkpoints: written atomically, read with `weights_only=True` (a downloaded file cannot run code).

A kdrun checkpoint is a dict of tensors, numbers, strings and plain containers:
`model` (the state dict), `arch` (name, kwargs, num_classes, in_chans) and whatever the
engine adds (`epoch`, `step`, `test_acc`, optimizer state...).
"""

import os
from pathlib import Path

import torch

from kdrun.errors import KdrunError


def save(obj: dict, path: str | Path) -> None:
    """Write `obj` to `path` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Read a checkpoint on the CPU; a missing or unreadable file is one clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdrunError(f"checkpoint {path} does not exist; give the path of a .pt file kdrun wrote "
                         "(runs keep them in <run dir>/checkpoints/) or a saved state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdrunError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "give a file written by kdrun or by torch.save(model.state_dict())") from e


def load_weights(model: torch.nn.Module, path: str | Path, what: str = "model") -> dict:
    """Load a kdrun checkpoint or a plain state_dict into `model`; returns the checkpoint dict."""
    ckpt = load(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdrunError(f"{path} holds no state_dict; give a file written by kdrun or by torch.save(model.state_dict())")
    mine = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in state.items()
                  if k in mine and v.shape != mine[k].shape]
    missing, unexpected = set(mine) - set(state), set(state) - set(mine)
    if mismatched or missing or unexpected:
        detail = mismatched[:2] or sorted(missing)[:2] or sorted(unexpected)[:2]
        arch = ckpt.get("arch") if "model" in ckpt else None
        saved = f" (saved for {arch})" if arch else ""
        raise KdrunError(f"the {what} checkpoint {path}{saved} does not fit this {what} "
                         f"(e.g. {'; '.join(detail)}); choose the architecture and dataset it was trained "
                         "with, or train a new one")
    model.load_state_dict(state)
    return ckpt
