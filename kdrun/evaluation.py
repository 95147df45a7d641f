"""Evaluation of a model on a loader: top-1 accuracy and cross-entropy, shared by the engine, the teacher
lookup and the methods (through the loop context)."""

import contextlib

import torch
import torch.nn.functional as F

from kdrun import dist


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, autocast=contextlib.nullcontext, ddp: bool = False,
             classes: tuple[int, ...] | None = None) -> dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of `model` over `loader` (over every rank's
    shard of it with `ddp`); with `classes`, the logits of the other classes are masked out first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss, count
    keep = None
    for batch in loader:
        with autocast():
            logits = model(batch["image"])
        if classes is not None:
            if keep is None:
                keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                keep[list(classes)] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        totals[0] += (logits.argmax(1) == batch["label"]).sum()
        totals[1] += F.cross_entropy(logits.float(), batch["label"], reduction="sum")
        totals[2] += len(batch["label"])
    model.train(was_training)
    if ddp:
        dist.all_reduce_sum(totals)
    correct, loss, n = totals.tolist()
    return {"acc": correct / n, "loss": loss / n}
