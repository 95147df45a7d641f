"""What a model is fed: its own input normalisation (`teacher.normalize`, `student.normalize`), and a warning when a
pretrained model's own data config disagrees with what it will be fed.

The loaders normalise every batch with the dataset's mean and std (`dataset.mean`, `dataset.std`). A model trained
elsewhere may expect another normalisation: timm's BiT weights expect inputs in [-1, 1] (mean = std = 0.5), not
ImageNet's mean and std. `normalize: {mean, std}` on the model's preset re-normalises the batch in front of that
model alone, x' = (x * std_d + mean_d - mean_m) / std_m, by a `Renormalize` module without parameters run by a
forward pre-hook: the model's state_dict, its module paths (feature hooks) and its checkpoints stay as they were.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdrun.errors import KdrunError

log = logging.getLogger(__name__)

ATTR = "input_renormalize"  # the child module that holds a model's Renormalize
TOLERANCE = 1e-3  # mean/std values closer than this agree (configs round them to 3 or 4 digits)


class Renormalize(nn.Module):
    """Maps a batch normalised with (`fed_mean`, `fed_std`) to one normalised with (`mean`, `std`), per channel.
    Its constants are non-persistent buffers: they follow `.to(device)` and stay out of the state_dict."""

    def __init__(self, fed_mean, fed_std, mean, std):
        super().__init__()
        fed_mean, fed_std, mean, std = (torch.tensor([float(v) for v in a]) for a in (fed_mean, fed_std, mean, std))
        self.register_buffer("scale", (fed_std / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((fed_mean - mean) / std).view(1, -1, 1, 1), persistent=False)
        self.fed = {"mean": fed_mean.tolist(), "std": fed_std.tolist()}
        self.own = {"mean": mean.tolist(), "std": std.tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f"fed={self.fed}, own={self.own}"


def _renormalize_input(model: nn.Module, args: tuple):
    return (getattr(model, ATTR)(args[0]), *args[1:])


def renormalize(model: nn.Module, fed_mean, fed_std, normalize, field: str) -> nn.Module:
    """`model`, which now re-normalises its input from (`fed_mean`, `fed_std`) to `normalize` ({mean, std}, the
    setting `field`); one sentence when `normalize` does not give one mean and one std per input channel."""
    mean, std = list(normalize.get("mean") or []), list(normalize.get("std") or [])
    channels = len(fed_mean)
    if set(normalize) - {"mean", "std"} or len(mean) != channels or len(std) != channels \
            or not all(s > 0 for s in std):
        raise KdrunError(f"{field}={dict(normalize)}; give {{mean: [...], std: [...]}}, {channels} values each "
                         "(one per input channel, std > 0), or null to feed the model the dataset's normalisation")
    model.add_module(ATTR, Renormalize(fed_mean, fed_std, mean, std))
    model.register_forward_pre_hook(_renormalize_input)
    return model


def input_config(model: nn.Module, name: str | None) -> dict | None:
    """The data config a model's pretrained weights were trained with, {mean, std, size}: timm's
    `model.pretrained_cfg`, or the transforms of the torchvision weights `pretrained=true` loads (their DEFAULT);
    None for a model that has neither."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("mean") and cfg.get("std"):
        return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "size": (cfg.get("input_size") or (None,))[-1]}
    name = str(name or "").removeprefix("torchvision:")
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    transform = weights.transforms()
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is None or std is None:
        return None
    size = getattr(transform, "crop_size", None)
    return {"mean": list(mean), "std": list(std), "size": size[0] if size else None}


def _differ(a, b) -> bool:
    return len(a) != len(b) or any(abs(x - y) > TOLERANCE for x, y in zip(a, b))


def check_pretrained_input(model: nn.Module, cfg, data, role: str) -> bool:
    """Log a warning (one sentence) when the pretrained `model`'s own data config (`input_config`) disagrees with
    what it will be fed: the `role` preset's `normalize`, else the dataset's mean and std, and the image size.
    Returns whether it warned."""
    own = input_config(model, cfg.get("name"))
    if own is None:
        return False
    normalize = cfg.get("normalize")
    fed_mean, fed_std = (list(normalize.mean), list(normalize.std)) if normalize else (list(data.mean), list(data.std))
    if len(own["mean"]) != len(fed_mean):  # a grey-scale dataset on an RGB model: compare with the channel average
        own = {**own, "mean": [sum(own["mean"]) / len(own["mean"])] * len(fed_mean),
               "std": [sum(own["std"]) / len(own["std"])] * len(fed_std)}
    problems, fixes = [], []
    if _differ(own["mean"], fed_mean) or _differ(own["std"], fed_std):
        problems.append(f"normalised with mean {_fmt(fed_mean)}, std {_fmt(fed_std)} where its weights expect mean "
                        f"{_fmt(own['mean'])}, std {_fmt(own['std'])}")
        fixes.append(f"{role}.normalize={{mean: {_fmt(own['mean'])}, std: {_fmt(own['std'])}}}")
    if own["size"] and data.image_size and own["size"] != data.image_size:
        problems.append(f"at {data.image_size} px where its weights were trained at {own['size']} px")
        fixes.append(f"dataset.image_size={own['size']} (for an image folder)")
    if problems:
        log.warning("%s %s (pretrained) will be fed images %s; set %s if that is not meant", role, cfg.get("name"),
                    " and ".join(problems), " and ".join(fixes))
    return bool(problems)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
