"""Forward hooks by module path (kdrun.features): what they capture, their errors, the probes built on them."""

import pytest
import torch
from torch import nn

from kdrun import features, models
from kdrun.errors import KdrunError


def _resnet8():
    torch.manual_seed(0)
    return models.create("resnet8", 10, in_chans=1).eval()


def test_hooks_capture_outputs_and_inputs_by_path():
    model = _resnet8()
    x = torch.randn(2, 1, 16, 16)
    hooks = features.FeatureHooks(model, ["layer1", "layer3", "fc:in", "layer2.0.relu:in"])
    out, (l1, l3, emb, pre) = hooks(x)
    stem = model.relu(model.bn1(model.conv1(x)))
    assert torch.allclose(l1, model.layer1(stem))
    assert torch.allclose(l3, model.layer3(model.layer2(l1)))
    assert torch.allclose(out, model.fc(emb)) and emb.shape == (2, 64)
    assert pre.shape == (2, 32, 8, 8) and (pre < 0).any()  # the in-place ReLU's input, cloned before it ran
    block = model.layer2[0]
    expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(l1))))) + block.downsample(l1)
    assert torch.allclose(pre, expected, atol=1e-6)


def test_hooks_record_only_while_called_and_can_be_removed():
    model = _resnet8()
    hooks = features.FeatureHooks(model, ["layer2"])
    model(torch.randn(1, 1, 16, 16))  # e.g. evaluation: nothing is kept
    assert hooks._out == []
    _, (feat,) = hooks(torch.randn(3, 1, 16, 16))
    assert feat.shape == (3, 32, 8, 8)
    hooks.remove()
    assert not model.layer2._forward_hooks


def test_unknown_path_lists_the_valid_ones():
    with pytest.raises(KdrunError, match=r"student has no module 'layer5'.*student.feature_layers.*layer1\.0\.conv1"):
        features.FeatureHooks(_resnet8(), ["layer5"], "student")
    with pytest.raises(KdrunError, match="did you mean layer2"):
        features.resolve(_resnet8(), "layr2", "teacher")


def test_a_module_the_forward_skips_is_a_clear_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.unused = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.fc(x)

    model = Skips()
    with pytest.raises(KdrunError, match="unused were not called"):
        features.FeatureHooks(model, ["unused"])(torch.randn(2, 4))


def test_classifier_input_preactivation_and_lower_parameters():
    model, x = _resnet8(), torch.randn(2, 1, 16, 16)
    assert features.classifier_input(model, x) == "fc:in"
    vgg = models.create("vgg8", 10, in_chans=1)
    assert features.classifier_input(vgg, torch.randn(2, 1, 32, 32)) == "classifier:in"
    assert features.preactivation(model, "layer1", x) == "layer1.0.relu:in"  # post-ReLU stage: its ReLU's input
    wrn = models.create("wrn_16_2", 10, in_chans=1)
    assert features.preactivation(wrn, "block1", x) == "block2.layer.0.relu1:in"  # named by the model: the next BN
    assert features.preactivation(wrn, "relu", x) == "relu:in"
    mobilenet = models.create("mobilenetv2", 10)
    assert features.preactivation(mobilenet, "blocks.1", torch.randn(2, 3, 32, 32)) == "blocks.1"  # linear output
    lower = {id(p) for p in features.parameters_before(model, "layer2", x)}
    named = dict(model.named_parameters())
    expected = {n for n in named if n.startswith(("conv1", "bn1", "layer1", "layer2"))}
    assert {n for n, p in named.items() if id(p) in lower} == expected


def test_any_torchvision_model_works_with_paths():
    model = models.create("resnet18", 10, in_chans=1).eval()
    _, feats = features.FeatureHooks(model, model.default_feature_layers)(torch.randn(1, 1, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    assert features.classifier_input(model, torch.randn(1, 1, 32, 32)) == "fc:in"
