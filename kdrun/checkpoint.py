"""Checkpoints: written atomically, read with `weights_only=True` (a downloaded file cannot run code).

A kdrun checkpoint is a dict of tensors, numbers, strings and plain containers:
`model` (the state dict), `arch` (name, kwargs, num_classes, in_chans) and whatever the
engine adds (`epoch`, `step`, `test_acc`, optimizer state...).
"""

import os
from pathlib import Path

import torch

from kdrun.errors import KdrunError, write_error


def save(obj: dict, path: str | Path) -> None:
    """Write `obj` to `path` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # through Python: a full disk is an OSError, not torch's RuntimeError
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        error = write_error(e, path)
        if error is None:
            raise
        raise error from e
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Read a checkpoint on the CPU; a missing or unreadable file is one clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdrunError(f"checkpoint {path} does not exist; give the path of a .pt file kdrun wrote "
                         "(runs keep them in <run dir>/checkpoints/) or a saved state_dict")
    if path.stat().st_size == 0:
        raise KdrunError(f"checkpoint {path} is empty (0 bytes: a copy or a disk that failed); delete it, or give "
                         "a file written by kdrun or by torch.save(model.state_dict())")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0]  # some errors have no message at all
        raise KdrunError(f"cannot read checkpoint {path} ({type(e).__name__}{': ' + reason if reason else ''}); "
                         "give a file written by kdrun or by torch.save(model.state_dict())") from e


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint kdrun wrote, rebuilt from its `arch` record alone, in eval mode; and the
    checkpoint dict."""
    from kdrun import models

    ckpt = load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("arch"), dict):
        raise KdrunError(f"{path} records no architecture (a plain state_dict?); give a checkpoint a kdrun run "
                         "wrote, such as <run dir>/checkpoints/best.pt")
    model = models.from_arch(ckpt["arch"])
    _fill(model, ckpt, path, "model")
    return model.eval(), ckpt


def load_weights(model: torch.nn.Module, path: str | Path, what: str = "model") -> dict:
    """Load a kdrun checkpoint or a plain state_dict into `model`; returns the checkpoint dict."""
    ckpt = load(path)
    _fill(model, ckpt, path, what)
    return ckpt


def _fill(model: torch.nn.Module, ckpt, path, what: str) -> None:
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
