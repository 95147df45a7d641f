"""The per-parameter importances that EWC's and MAS's quadratic penalties weigh (`continual.quadratic_penalty`).

Each is the mean over images of a per-sample quantity, computed as if one sample at a time but batched with
`torch.func` (`functional_call` + `vmap` + `grad`). Squaring (or taking the absolute value of) the gradient of a
mini-batch's mean loss instead averages before the square and underestimates the importance, by up to the batch
size where the samples' gradients disagree: the known mistake of several libraries.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

FISHER_VARIANTS = ("exact", "sampled", "empirical")
_CHUNK_FLOATS = 2**25  # per-sample gradient elements held at once (128 MB in float32)


def per_sample_grads(model: nn.Module, names: list[str], fn: Callable, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """For each sample of `inputs` (tensors whose first dimension is the batch, the first the images), the gradient
    of the scalar `fn(model(x)[0], *rest)` with respect to `model`'s parameters `names`: one tensor per name, of
    shape (batch, *parameter shape). The model runs in the mode it is in (eval for an importance: no batch
    statistics), its other parameters and its buffers held fixed."""
    params = dict(model.named_parameters())
    trained = {n: params[n].detach() for n in names}
    fixed = {**{n: p.detach() for n, p in params.items() if n not in trained}, **dict(model.named_buffers())}

    def one(weights, x, *rest):
        out = functional_call(model, {**fixed, **weights}, (x.unsqueeze(0),))
        return fn(out[0], *rest)

    grads = vmap(grad(one), in_dims=(None, *[0] * len(inputs)))(trained, *inputs)
    return [grads[n] for n in names]


def _chunks(n_params: int, *tensors: torch.Tensor):
    """The batch cut so that a chunk's per-sample gradients stay under _CHUNK_FLOATS elements."""
    size = max(1, _CHUNK_FLOATS // max(1, n_params))
    for start in range(0, len(tensors[0]), size):
        yield tuple(t[start:start + size] for t in tensors)


def _capped(batches: Iterable[dict], max_samples: int | None):
    """The batches' images and labels, the first `max_samples` of them (None: all)."""
    seen = 0
    for batch in batches:
        x, y = batch["image"], batch["label"]
        if max_samples is not None:
            x, y = x[:max_samples - seen], y[:max_samples - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if max_samples is not None and seen >= max_samples:
            return


def log_likelihood(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """log p(label | x) = log_softmax(logits)[label], over all the logits given."""
    return F.log_softmax(logits.float(), -1).gather(-1, label.unsqueeze(-1)).squeeze(-1)


def squared_norm(out: torch.Tensor) -> torch.Tensor:
    """||out||_2^2."""
    return (out.float() ** 2).sum()


def fisher_diagonal(model: nn.Module, names: list[str], batches: Iterable[dict], variant: str = "exact",
                    max_samples: int | None = None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The diagonal of the Fisher information of `model`'s parameters `names` (one tensor per name): the mean over
    the images of `batches` (the first `max_samples`) of a per-sample term on log p(y|x) = log_softmax(logits)[y],
    over all the model's logits:

    - `exact`: sum over classes c of p(c|x) * (d log p(c|x) / d theta)^2, the expectation under the model
      (one gradient per class and image);
    - `sampled`: (d log p(y|x) / d theta)^2 for one y drawn from p(.|x) with `generator` (a one-sample Monte-Carlo
      estimate of the same);
    - `empirical`: the same at the true label y (the "empirical Fisher", not the Fisher of the model)."""
    if variant not in FISHER_VARIANTS:
        raise ValueError(f"unknown Fisher variant '{variant}'; use one of {', '.join(FISHER_VARIANTS)}")
    params = dict(model.named_parameters())
    total = [torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names]
    n_params, seen = sum(params[n].numel() for n in names), 0
    for x, y in _capped(batches, max_samples):
        for xs, ys in _chunks(n_params, x, y):
            if variant == "empirical":
                terms = [(torch.ones(len(xs), device=xs.device), ys)]
            else:
                with torch.no_grad():
                    probs = F.softmax(model(xs).float(), -1)
                if variant == "sampled":
                    drawn = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(ys.device)
                    terms = [(torch.ones(len(xs), device=xs.device), drawn)]
                else:
                    terms = [(probs[:, c], torch.full_like(ys, c)) for c in range(probs.shape[1])]
            for weight, label in terms:
                for t, g in zip(total, per_sample_grads(model, names, log_likelihood, xs, label)):
                    t += torch.einsum("b,b...->...", weight, g.detach().float() ** 2)
        seen += len(x)
    return [t / max(seen, 1) for t in total]


def mas_importance(model: nn.Module, names: list[str], batches: Iterable[dict],
                   max_samples: int | None = None) -> list[torch.Tensor]:
    """MAS's importance (Aljundi et al. 2018, Eq. 4): the mean over the images of `batches` (the first
    `max_samples`) of |d ||f(x)||_2^2 / d theta| per sample, f(x) the model's output (all its logits); label-free."""
    params = dict(model.named_parameters())
    total = [torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names]
    n_params, seen = sum(params[n].numel() for n in names), 0
    for x, _ in _capped(batches, max_samples):
        for (xs,) in _chunks(n_params, x):
            for t, g in zip(total, per_sample_grads(model, names, squared_norm, xs)):
                t += g.detach().float().abs().sum(0)
        seen += len(x)
    return [t / max(seen, 1) for t in total]
