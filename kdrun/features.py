"""Intermediate features read with forward hooks by module path, never by forking a model's forward.

A feature is named by a module path, a key of ``dict(model.named_modules())`` (``layer2``, ``blocks.5``):
the module's output. ``PATH:in`` names the module's input instead (its first positional argument),
e.g. ``fc:in`` for the embedding a classifier receives, or ``layer3.2.relu:in`` for a pre-activation.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from kdrun.errors import KdrunError

INPUT_SUFFIX = ":in"


def _split(spec: str) -> tuple[str, bool]:
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def resolve(model: nn.Module, spec: str, role: str = "model") -> nn.Module:
    """The module a feature spec names; an unknown path is a KdrunError listing the valid paths."""
    path, _ = _split(spec)
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    valid = [p for p in modules if p]
    close = difflib.get_close_matches(path, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise KdrunError(f"the {role} has no module '{path}'{hint}; set {role}.feature_layers to module paths from: "
                     f"{', '.join(valid)} (append '{INPUT_SUFFIX}' for a module's input)")


class FeatureHooks:
    """Forward hooks on `specs` of `model`; calling it runs the model and returns (output, [features]).

    The hooks record only during that call, so evaluation and other forwards pay nothing. A module
    called several times in one forward (a ReLU shared inside a block) gives its last call's tensor.
    Inputs of in-place modules are cloned before the module overwrites them.
    """

    def __init__(self, model: nn.Module, specs: Sequence[str], role: str = "model"):
        self.model = model
        self.specs = list(specs)
        self.role = role
        self._out: list[torch.Tensor | None] = []
        self._recording = False
        self._handles = []
        for i, spec in enumerate(self.specs):
            module = resolve(model, spec, role)
            if _split(spec)[1]:
                clone = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(i, clone)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(i)))

    def _input_hook(self, i: int, clone: bool):
        def hook(module, args):
            if self._recording:
                self._out[i] = args[0].clone() if clone else args[0]
        return hook

    def _output_hook(self, i: int):
        def hook(module, args, output):
            if self._recording:
                self._out[i] = output
        return hook

    def __call__(self, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._out = [None] * len(self.specs)
        self._recording = True
        try:
            output = self.model(*args)
        finally:
            self._recording = False
        feats, self._out = self._out, []
        missing = [s for s, f in zip(self.specs, feats) if f is None]
        if missing:
            raise KdrunError(f"the {self.role}'s modules {', '.join(missing)} were not called in its forward pass; "
                             f"set {self.role}.feature_layers to modules the forward pass uses")
        return output, feats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def probe_input(model: nn.Module, shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    """A fixed random batch of `shape` (C, H, W) on the model's device, drawn without touching the global RNG."""
    device = next(model.parameters()).device
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)


class _Eval:
    """Context: the model in eval mode (no BatchNorm statistics change), its mode restored after."""

    def __init__(self, model: nn.Module):
        self.model, self.mode = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.mode)


def probe(model: nn.Module, specs: Sequence[str], x: torch.Tensor, role: str = "model") -> list[torch.Tensor]:
    """The features `specs` of `model` for the probe batch `x`, in eval mode and without gradient."""
    hooks = FeatureHooks(model, specs, role)
    try:
        with _Eval(model), torch.no_grad():
            _, feats = hooks(x)
    finally:
        hooks.remove()
    return feats


def _call_order(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> list[tuple[str, torch.Tensor]]:
    """(path, output) of every module of the given kinds, in the order of their calls in one forward."""
    calls, handles = [], []
    for path, module in model.named_modules():
        if isinstance(module, kinds):
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: calls.append((p, o))))
    try:
        with _Eval(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def classifier_input(model: nn.Module, x: torch.Tensor, role: str = "model") -> str:
    """The spec of the embedding the model's classifier receives: the input of its last-called nn.Linear."""
    calls = _call_order(model, x, (nn.Linear,))
    if not calls:
        raise KdrunError(f"the {role} has no nn.Linear classifier whose input could serve as its embedding; "
                         f"set {role}.feature_layers to the module path of the embedding")
    return calls[-1][0] + INPUT_SUFFIX


def preactivation(model: nn.Module, spec: str, x: torch.Tensor) -> str:
    """The spec of the pre-ReLU response at the end of stage `spec`.

    Where the model names it in its `preact_layers` (stage spec -> spec), that one (a pre-activation
    network's next BatchNorm, before its ReLU). Else, if the stage's output is non-negative (it ends with a
    ReLU, perhaps followed by pooling), the input of the last nn.ReLU called inside the stage; otherwise
    (linear bottlenecks) the stage output itself, which is already the pre-activation.
    """
    named = getattr(model, "preact_layers", None) or {}
    if spec in named:
        return named[spec]
    path, is_input = _split(spec)
    if is_input:
        return spec
    prefix = path + "."
    relus = [p for p, _ in _call_order(model, x, (nn.ReLU,)) if p.startswith(prefix) or p == path]
    (feat,) = probe(model, [spec], x)
    if relus and bool((feat >= 0).all()):
        return relus[-1] + INPUT_SUFFIX
    return spec


def parameters_before(model: nn.Module, spec: str, x: torch.Tensor) -> list[nn.Parameter]:
    """The parameters the feature `spec` depends on: the model's lower part up to that layer (found by autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = FeatureHooks(model, [spec])
    try:
        with _Eval(model), torch.enable_grad():
            _, (feat,) = hooks(x)
            grads = torch.autograd.grad(feat.float().sum(), params, allow_unused=True)
    finally:
        hooks.remove()
    return [p for p, g in zip(params, grads) if g is not None]
