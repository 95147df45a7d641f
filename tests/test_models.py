"""Tests for kdrun.models: kdrun's own nets, the torchvision and timm paths, and the error messages."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.models import create, list_models

# Extra arguments some nets need to build for a given input size.
_BUILD_KWARGS = {"wrn": {"depth": 10, "widen_factor": 1}}

# Published parameter counts (millions, 100 classes) of CRD/RepDistiller CIFAR-100 benchmark nets; the benchmark's
# reference code gives exactly 1233540, 7433860, 861620, 278324, 2255156 and 703284, which round to these.
_PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
}


def _build(name: str, num_classes: int, in_chans: int, size: int) -> nn.Module:
    kwargs = dict(_BUILD_KWARGS.get(name, {}))
    if name == "mlp":
        kwargs["image_size"] = size
    return create(name, num_classes, in_chans=in_chans, **kwargs)


def _forward_with_hooks(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run ``model`` on ``x`` with a forward hook on each default feature layer; return logits and captures.

    Fails if a captured tensor is modified in place later in the forward pass (it would reach a loss changed).
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {path: [] for path in model.default_feature_layers}
    copies: dict[str, list[torch.Tensor]] = {path: [] for path in model.default_feature_layers}

    def hook(path: str, out: torch.Tensor) -> None:
        captured[path].append(out)
        copies[path].append(out.detach().clone())

    handles = [
        modules[path].register_forward_hook(lambda _m, _i, out, path=path: hook(path, out))
        for path in model.default_feature_layers
    ]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    for path in captured:
        assert all(torch.equal(a, b) for a, b in zip(captured[path], copies[path])), f"{path} changed in place"
    return logits, captured


def _logits_with_last_features_set_to_one(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    last = dict(model.named_modules())[model.default_feature_layers[-1]]
    handle = last.register_forward_hook(lambda _m, _i, out: torch.ones_like(out))
    try:
        return model(x)
    finally:
        handle.remove()


def _logits_of_ones(model: nn.Module) -> torch.Tensor:
    """What the head (the last Linear) gives for an all-ones input: any pooling of an all-ones map is all ones."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return head(torch.ones(1, head.in_features))


@pytest.mark.parametrize("name", list_models())
def test_own_model_forward_and_feature_hooks(name: str) -> None:
    """Logits and hooked features for 3x32x32 (100 classes), 1x28x28 and 1x8x8 (10 classes) inputs."""
    models = {}
    for in_chans, size, num_classes in [(3, 32, 100), (1, 28, 10), (1, 8, 10)]:
        key = (in_chans, num_classes, size if name == "mlp" else None)
        if key not in models:
            models[key] = _build(name, num_classes, in_chans, size)
        model, where = models[key], f"{name} on {in_chans}x{size}x{size}"
        assert model.default_feature_layers, f"{where}: every kdrun net names its feature layers"
        assert set(model.default_feature_layers) <= set(dict(model.named_modules()))
        x = torch.randn(2, in_chans, size, size)
        logits, captured = _forward_with_hooks(model, x)
        assert logits.shape == (2, num_classes), where
        for path, outputs in captured.items():
            assert len(outputs) == 1, f"{where}: hook on {path} fired {len(outputs)} times"
            assert outputs[0].dim() == (2 if name == "mlp" else 4), f"{where}: {path} gave {outputs[0].shape}"
        # The last feature layer is the last stage: only pooling (and dropout) lies between it and the head, except
        # in nets whose head starts with a BN-ReLU or a 1x1 conv (the CRD benchmark's lists end before it): there
        # the head pools a map of its size.
        if name.startswith(("wrn", "mobilenetv2", "shufflenetv2")):
            (pooled,) = features.probe(model, ["avgpool:in"], x)
            assert pooled.shape[2:] == captured[model.default_feature_layers[-1]][0].shape[2:], where
        else:
            ones_logits = _logits_with_last_features_set_to_one(model, x)
            assert torch.allclose(ones_logits, _logits_of_ones(model).expand_as(ones_logits), atol=1e-5), where
    # Captured features and logits backpropagate together, as in a feature distillation loss.
    loss = logits.sum() + sum(outputs[0].pow(2).mean() for outputs in captured.values())
    loss.backward()


@pytest.mark.parametrize("name,published_m", sorted(_PUBLISHED_PARAMS_M.items()))
def test_parameter_counts_match_the_benchmark(name: str, published_m: float) -> None:
    count = sum(p.numel() for p in create(name, 100).parameters())
    assert count / 1e6 == pytest.approx(published_m, rel=0.02)


def test_cnn_layout() -> None:
    model = create("cnn", 10, in_chans=1, width=8, depth=2, dropout=0.1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    _, captured = _forward_with_hooks(model, torch.randn(2, 1, 28, 28))
    assert [tuple(captured[p][0].shape) for p in model.default_feature_layers] == [
        (2, 8, 14, 14),
        (2, 16, 7, 7),
        (2, 32, 7, 7),
    ]


def test_torchvision_resnet18_with_one_channel() -> None:
    model = create("resnet18", 10, in_chans=1)
    assert model.conv1.in_channels == 1
    assert model.default_feature_layers == ["layer1", "layer2", "layer3", "layer4"]
    logits, captured = _forward_with_hooks(model, torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert all(outputs[0].dim() == 4 for outputs in captured.values())


def test_torchvision_prefix_and_generic_first_conv() -> None:
    model = create("torchvision:mobilenet_v3_small", 10, in_chans=1)
    assert model.features[0][0].in_channels == 1
    assert model.default_feature_layers == []
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pretrained_helpers_resize_head_and_sum_rgb_filters() -> None:
    import torchvision

    from kdrun.models import _adapt_first_conv, _replace_head

    model = torchvision.models.squeezenet1_1(weights=None)  # its head is a 1x1 conv
    rgb = model.features[0].weight.detach().clone()
    _adapt_first_conv(model, "squeezenet1_1", 1, pretrained=True)
    _replace_head(model, "squeezenet1_1", 1000, 7)
    assert torch.equal(model.features[0].weight, rgb.sum(dim=1, keepdim=True))
    assert model.classifier[1].out_channels == 7
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model = torchvision.models.mobilenet_v3_small(weights=None)  # its head is the last of several Linears
    _replace_head(model, "mobilenet_v3_small", 1000, 7)
    assert (model.classifier[0].out_features, model.classifier[3].out_features) == (1024, 7)


def test_timm_model_with_one_channel() -> None:
    model = create("timm:test_resnet", 10, in_chans=1)
    assert model.default_feature_layers
    logits, captured = _forward_with_hooks(model, torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert all(len(outputs) == 1 and outputs[0].dim() == 4 for outputs in captured.values())


def test_unknown_name_lists_kdrun_models() -> None:
    with pytest.raises(KdrunError) as info:
        create("resnt18", 10)
    message = str(info.value)
    assert "'resnt18'" in message and "resnet8" in message and "cnn" in message and "timm:" in message
    assert "resnet18" in message  # the close match is suggested


def test_unknown_timm_name() -> None:
    with pytest.raises(KdrunError, match="unknown timm model 'no_such_net'"):
        create("timm:no_such_net", 10)


def test_pretrained_own_model_points_to_checkpoint() -> None:
    with pytest.raises(KdrunError, match=r"no pretrained weights.*teacher\.checkpoint"):
        create("resnet8", 10, pretrained=True)


def test_unaccepted_kwargs_name_the_accepted_ones() -> None:
    with pytest.raises(KdrunError, match="does not take widht.*width, depth, dropout"):
        create("cnn", 10, widht=8)
    with pytest.raises(KdrunError, match="does not take dropout.*: none"):
        create("resnet8", 10, dropout=0.1)
    with pytest.raises(KdrunError, match="needs the arguments depth, widen_factor"):
        create("wrn", 10)
    with pytest.raises(KdrunError, match="depth 6n\\+4"):
        create("wrn", 10, depth=12, widen_factor=2)


def test_mlp_wrong_image_size_says_how_to_fix() -> None:
    model = create("mlp", 10, in_chans=1)
    with pytest.raises(KdrunError, match="image_size=32"):
        model(torch.randn(2, 1, 32, 32))


def test_own_models_do_not_import_timm_or_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("timm", "torchvision"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    assert create("cnn", 10, in_chans=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
def test_pretrained_weights_that_cannot_be_downloaded_are_one_sentence(name, monkeypatch) -> None:
    import urllib.error

    import timm
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(KdrunError, match=r"^the pretrained weights of 'resnet18' could not be downloaded \(URLError\); "
                                         r"run once with internet access .* init=PATH$"):
        create(name, 10, pretrained=True)
