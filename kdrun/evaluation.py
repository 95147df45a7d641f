"""Evaluation of a model on a loader: top-1 accuracy and cross-entropy, shared by the engine, the teacher
lookup and the methods (through the loop context)."""

import contextlib

import torch
import torch.nn.functional as F

from kdrun import dist


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, autocast=contextlib.nullcontext, ddp: bool = False,
             classes: tuple[int, ...] | None = None, detail: bool = False) -> dict:
    """Top-1 accuracy (a fraction) and mean cross-entropy of `model` over `loader` (over every rank's
    shard of it with `ddp`); with `classes`, the logits of the other classes are masked out first (the loss is
    then None when some image's class is masked out: its cross-entropy is infinite). With `detail`, also `top5`
    (accuracy) and `confusion` (counts, a list of rows: true class by predicted class)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct, loss, count, labels masked out
    keep, hidden, confusion = None, None, None
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        with autocast():
            logits = model(batch["image"])
        if classes is not None:
            if keep is None:
                keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                keep[list(classes)] = True
            logits = logits.masked_fill(~keep, float("-inf"))
            hidden = ~keep[batch["label"]]
            totals[3] += hidden.sum()
        totals[0] += (logits.argmax(1) == batch["label"]).sum()
        loss = F.cross_entropy(logits.float(), batch["label"], reduction="none")
        totals[1] += (loss if hidden is None else loss.masked_fill(hidden, 0)).sum()
        totals[2] += len(batch["label"])
        if detail:
            n = logits.shape[1]
            top5 += (logits.topk(min(5, n), 1).indices == batch["label"][:, None]).any(1).sum()
            if confusion is None:
                confusion = torch.zeros(n * n, dtype=torch.long, device=device)
            confusion += torch.bincount(batch["label"] * n + logits.argmax(1), minlength=n * n)
    model.train(was_training)
    if ddp:
        dist.all_reduce_sum(totals)
    correct, loss, n, hidden = totals.tolist()
    result = {"acc": correct / n, "loss": None if hidden else loss / n}
    if detail:
        if ddp:
            dist.all_reduce_sum(top5)
            dist.all_reduce_sum(confusion)
        size = round(len(confusion) ** 0.5)
        result.update(top5=top5.item() / n, confusion=confusion.view(size, size).tolist())
    return result
