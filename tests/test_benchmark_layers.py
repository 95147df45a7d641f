"""The feature layers kdrun's methods read from its CIFAR nets are the CRD benchmark's (Tian et al., RepDistiller).

RepDistiller's models return, with `is_feat=True`, `feat = [f0, f1, ..., f_last_map, f_pooled]` and its
train_student.py / helper/loops.py read, per method: AT, NST, VID, KDSVD, AB `feat[1:-1]` (AB with
`preact=True`), SP and FT `feat[-2]`, FitNet `feat[hint_layer]` (hint_layer=2), RKD, PKT, CC, CRD `feat[-1]`,
FSP `feat[:-1]` (helper/pretrain.py); mdistiller's ReviewKD, on copies of these models, `feat[1:]` (the
teacher's with preact). RepDistiller's code cannot be imported here, so each model's `feat` list is written
out below as RepDistiller's forward computes it (models/<file>.py, the line numbers of HobbitLong/RepDistiller
b84f547), by calling kdrun's modules by hand, never through hooks; the features kdrun's methods choose and hook
on a fixed input must equal them. BatchNorm statistics and affine parameters are randomised, so a map before a
BatchNorm and after it differ.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdrun import features, models
from kdrun.methods.ab import AB
from kdrun.methods.at import AT
from kdrun.methods.fitnet import FitNet
from kdrun.methods.fsp import FSP
from kdrun.methods.reviewkd import ReviewKD
from kdrun.methods.rkd import RKD
from kdrun.methods.sp import SP

SHAPE = (3, 32, 32)
TOL = 1e-4  # summation order (pooling, deep residual sums of large values) aside, the tensors are the same


def _shuffle(x, groups):
    """RepDistiller's ShuffleBlock: (N, g, C/g, H, W) permuted to (N, C/g, g, H, W)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _resnet(m, x):
    """models/resnet.py:178-200; a stage's preact is its last block's out + residual (BasicBlock, lines 38-57)."""
    def stage(layer, h):
        h = layer[:-1](h)
        b = layer[-1]
        pre = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + (h if b.downsample is None else b.downsample(h))
        return F.relu(pre), pre

    f0 = F.relu(m.bn1(m.conv1(x)))
    f1, p1 = stage(m.layer1, f0)
    f2, p2 = stage(m.layer2, f1)
    f3, p3 = stage(m.layer3, f2)
    f4 = F.avg_pool2d(f3, 8).flatten(1)
    return [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


def _wrn(m, x):
    """models/wrn.py:101-121: f3 is block3's raw output (before the final BN-ReLU); preact applies the next BN."""
    f0 = m.conv1(x)
    f1 = m.block1(f0)
    f2 = m.block2(f1)
    f3 = m.block3(f2)
    f4 = F.avg_pool2d(F.relu(m.bn1(f3)), 8).flatten(1)
    pre = [f0, m.block2.layer[0].bn1(f1), m.block3.layer[0].bn1(f2), m.bn1(f3), f4]
    return [f0, f1, f2, f3, f4], pre


def _vgg(m, x):
    """models/vgg.py:64-100 (32x32 input, so no pool3); its blocks end with the BN, the ReLU follows in forward."""
    def stage(block, h):
        pre = block[:-1](h)  # kdrun's block ends with the ReLU RepDistiller's forward applies
        return F.relu(pre), pre

    f0 = F.relu(m.block0[:-1](x))
    f1, p1 = stage(m.block1, F.max_pool2d(f0, 2))
    f2, p2 = stage(m.block2, F.max_pool2d(f1, 2))
    f3, p3 = stage(m.block3, F.max_pool2d(f2, 2))
    f4, p4 = stage(m.block4, f3)
    f5 = F.adaptive_avg_pool2d(f4, 1).flatten(1)
    return [f0, f1, f2, f3, f4, f5], [f0, p1, p2, p3, p4, f5]


def _mobilenetv2(m, x):
    """models/mobilenetv2.py:132-160: groups 1, 2, 4, 6; conv2 only feeds the pooled f5; preact is ignored."""
    f0 = m.conv1(x)
    f1 = m.blocks[1](m.blocks[0](f0))
    f2 = m.blocks[2](f1)
    f3 = m.blocks[4](m.blocks[3](f2))
    f4 = m.blocks[6](m.blocks[5](f3))
    f5 = F.avg_pool2d(m.conv2(f4), 2, ceil_mode=True).flatten(1)
    feats = [f0, f1, f2, f3, f4, f5]
    return feats, feats


def _shufflenetv1(m, x):
    """models/ShuffleNetv1.py:95-115; Bottleneck (lines 41-53): preact = out + res (cat when stride 2)."""
    def stage(layer, h):
        h = layer[:-1](h)
        b = layer[-1]
        out = _shuffle(F.relu(b.bn1(b.conv1(h))), b.first_groups)
        out = b.bn3(b.conv3(F.relu(b.bn2(b.conv2(out)))))
        pre = torch.cat([out, F.avg_pool2d(h, 3, 2, 1)], 1) if b.stride == 2 else out + h
        return F.relu(pre), pre

    f0 = F.relu(m.bn1(m.conv1(x)))
    f1, p1 = stage(m.layer1, f0)
    f2, p2 = stage(m.layer2, f1)
    f3, p3 = stage(m.layer3, f2)
    f4 = F.avg_pool2d(f3, 4).flatten(1)
    return [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


def _shufflenetv2(m, x):
    """models/ShuffleNetv2.py:140-161; BasicBlock (lines 48-61): out = shuffle(cat(x1, relu(pre))) and the
    preact cat(x1, pre), not shuffled; the 1x1 head conv2 only feeds the pooled f4."""
    def stage(layer, h):
        h = layer[:-1](h)
        b = layer[-1]
        c = h.shape[1] // 2
        x1, x2 = h[:, :c], h[:, c:]
        pre = b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2)))))))
        return _shuffle(torch.cat([x1, F.relu(pre)], 1), 2), torch.cat([x1, pre], 1)

    f0 = F.relu(m.bn1(m.conv1(x)))
    f1, p1 = stage(m.layer1, f0)
    f2, p2 = stage(m.layer2, f1)
    f3, p3 = stage(m.layer3, f2)
    f4 = F.avg_pool2d(F.relu(m.bn2(m.conv2(f3))), 4).flatten(1)
    return [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


BENCHMARK = {
    **{name: _resnet for name in ("resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4")},
    **{name: _wrn for name in ("wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "vgg8": _vgg, "vgg13": _vgg, "mobilenetv2": _mobilenetv2, "shufflenetv1": _shufflenetv1,
    "shufflenetv2": _shufflenetv2,
}

# (method class, (student, teacher) read with preact, which of RepDistiller's features it reads)
POSITIONS = {
    "stages (AT, NST, VID, KDSVD)": (AT, (False, False), lambda f: f[1:-1]),
    "last (SP, FT)": (SP, (False, False), lambda f: f[-2:-1]),
    "middle (FitNet, hint_layer=2)": (FitNet, (False, False), lambda f: f[2:3]),
    "preact stages (AB)": (AB, (True, True), lambda f: f[1:-1]),
    "embedding (RKD, PKT, CC, CRD)": (RKD, (False, False), lambda f: f[-1:]),
    "input+stages (FSP)": (FSP, (False, False), lambda f: f[:-1]),
    # mdistiller's ReviewKD (its models are RepDistiller's): the student's feats[1:] + [pooled_feat], the
    # teacher's preact_feats[1:] + [pooled_feat]
    "stages+embedding (ReviewKD)": (ReviewKD, (False, True), lambda f: f[1:]),
}


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("name", sorted(BENCHMARK))
def test_methods_read_the_benchmarks_feature_layers(name):
    model = models.create(name, 100).eval()
    _randomise_batchnorm(model)
    x = features.probe_input(model, SHAPE)
    with torch.no_grad():
        feats, preacts = BENCHMARK[name](model, x)
    for position, (cls, preact, pick) in POSITIONS.items():
        method = cls(student=model, teacher=model)
        method.input_shape = SHAPE
        t_specs = method.specs(model, "teacher")
        t_feats = features.probe(model, t_specs, x)
        s_feats = features.probe(model, method.specs(model, "student", t_feats), x)
        for role, got in (("teacher", t_feats), ("student", s_feats)):
            expected = pick(preacts if preact[role == "teacher"] else feats)
            assert len(got) == len(expected), f"{name} {position} {role}: {t_specs}"
            for i, (g, e) in enumerate(zip(got, expected)):
                torch.testing.assert_close(g, e, rtol=TOL, atol=TOL,
                                           msg=lambda m, at=f"{name} {position} {role} {i} ({t_specs})": f"{at}: {m}")


@pytest.mark.parametrize("name", sorted(BENCHMARK))
def test_the_nets_compute_the_benchmarks_features_and_logits(name):
    """The hand-written lists above follow kdrun's forward: its logits come from the same pooled embedding."""
    model = models.create(name, 100).eval()
    _randomise_batchnorm(model)
    x = features.probe_input(model, SHAPE)
    with torch.no_grad():
        feats, _ = BENCHMARK[name](model, x)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        torch.testing.assert_close(model(x), head(feats[-1]), rtol=TOL, atol=TOL)
