"""What a model costs at inference, on one image: FLOPs of its forward and its measured latency."""

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _one_image(model: torch.nn.Module, shape) -> torch.Tensor:
    return torch.zeros(1, *shape, device=next(model.parameters()).device)


def _eager(model: torch.nn.Module):
    """`model`'s forward without the compiled call `trainer.compile` gave it (the model as exported)."""
    return model.forward if getattr(model, "_compiled_call_impl", None) is not None else model


def flops(model: torch.nn.Module, shape) -> int:
    """FLOPs of one forward of `model` in eval mode on one image of `shape` (C, H, W), as
    `torch.utils.flop_counter` counts them (a multiply-add is two; convolutions and matrix products only)."""
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            _eager(model.eval())(_one_image(model, shape))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def latency_ms(model: torch.nn.Module, shape, warmup: int = 2, repeats: int = 10, budget_s: float = 0.25) -> float:
    """The median time in milliseconds of a batch-1 forward of `model` (eval mode, no gradient, eager) on its
    device, after `warmup` forwards; at most `repeats` timed forwards, fewer once `budget_s` is spent."""
    x, forward = _one_image(model, shape), _eager(model)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    was_training = model.training
    times = []
    try:
        with torch.inference_mode():
            model.eval()
            for _ in range(warmup):
                forward(x)
            sync()
            spent = time.perf_counter()
            while len(times) < repeats and (not times or time.perf_counter() - spent < budget_s):
                start = time.perf_counter()
                forward(x)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return round(statistics.median(times) * 1e3, 4)
