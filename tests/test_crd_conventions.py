"""The losses whose normalisation the CRD benchmark (Tian et al., RepDistiller) chose differently from the paper:
each convention on fixed tensors against its formula written out by hand (the paper's for the default, the
benchmark code's for the option; plain loops and torch ops, never kdrun.losses), and the `method=crd/...`
configs and CRD presets resolving to the benchmark's conventions and weights (its scripts/run_cifar_distill.sh
and train_student.py: -r 1, -a 0 and -b per method; KD -r 0.1 -a 0.9; CRD+KD -a 1)."""

import itertools
import json
import math
from importlib.resources import files
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cfg
from torch import nn

from kdrun.losses import (
    cc_loss,
    ft_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    standardize,
)
from kdrun.methods.cc import CC
from kdrun.methods.ft import FT
from kdrun.methods.pkt import PKT
from kdrun.methods.rkd import RKD
from kdrun.run import run

DT = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _close(actual, expected, rtol=1e-9):
    assert torch.allclose(torch.as_tensor(actual, dtype=DT), torch.as_tensor(expected, dtype=DT), rtol=rtol, atol=1e-12), \
        (float(actual), float(expected))


def _huber(a, b):
    d = abs(float(a) - float(b))
    return 0.5 * d * d if d < 1 else d - 0.5


def _unit(v):
    n = float(v.norm())
    return v / n if n > 0 else torch.zeros_like(v)


def _models():
    return nn.Linear(1, 1), nn.Linear(1, 1)


# ------------------------------------------------------------------------------------------------ RKD

S, T = _randn(5, 3, seed=1), _randn(5, 4, seed=2) * 3
B = 5


def _distances(x):
    d = [[float((x[i] - x[j]).norm()) for j in range(B)] for i in range(B)]
    mu = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
    return [[v / mu for v in row] for row in d]


def _cosines(x):
    """cos[i][j][k] = <e_ij, e_ik>, e_ij the unit vector from x_i to x_j (0 where they coincide)."""
    e = [[_unit(x[j] - x[i]) for j in range(B)] for i in range(B)]
    return [[[float(e[i][j] @ e[i][k]) for k in range(B)] for j in range(B)] for i in range(B)]


def test_rkd_distance_paper_mean_over_pairs_benchmark_mean_over_all_b_squared_entries():
    ds, dt = _distances(S), _distances(T)
    pairs = list(itertools.combinations(range(B), 2))
    paper = sum(_huber(ds[i][j], dt[i][j]) for i, j in pairs) / len(pairs)
    bench = sum(_huber(ds[i][j], dt[i][j]) for i in range(B) for j in range(B)) / B**2  # RKD.py:25-29
    _close(rkd_distance_loss(S, T), paper)
    _close(rkd_distance_loss(S, T, include_diagonal=True), bench)


@pytest.mark.parametrize("duplicate", [False, True])
def test_rkd_angle_paper_mean_over_distinct_triplets_benchmark_mean_over_all_b_cubed_entries(duplicate):
    s = S.clone()
    if duplicate:  # two coincident student points: their unit vectors are 0 in both conventions
        s[3] = s[1]
    cs, ct = _cosines(s), _cosines(T)
    triplets = list(itertools.permutations(range(B), 3))
    paper = sum(_huber(cs[i][j][k], ct[i][j][k]) for i, j, k in triplets) / len(triplets)
    bench = sum(_huber(cs[i][j][k], ct[i][j][k]) for i, j, k in itertools.product(range(B), repeat=3)) / B**3
    _close(rkd_angle_loss(s, T), paper, rtol=1e-7)
    _close(rkd_angle_loss(s, T, include_diagonal=True), bench, rtol=1e-7)  # RKD.py:32-41


def test_rkd_method_passes_its_convention_to_both_terms():
    ds, dt, cs, ct = _distances(S), _distances(T), _cosines(S), _cosines(T)
    dist = sum(_huber(ds[i][j], dt[i][j]) for i in range(B) for j in range(B)) / B**2
    angle = sum(_huber(cs[i][j][k], ct[i][j][k]) for i, j, k in itertools.product(range(B), repeat=3)) / B**3
    losses = RKD(*_models(), include_diagonal=True).distill([S], [T], {})  # the benchmark's 25 and 50, -b 1
    _close(losses["rkd_d"], 25 * dist, rtol=1e-7)
    _close(losses["rkd_a"], 50 * angle, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ PKT


def _pkt_conditionals(x, self_pairs, eps=1e-7):
    u = [x[i] / (float(x[i].norm()) + eps) for i in range(B)]
    k = [[(float(u[i] @ u[j]) + 1) / 2 if (self_pairs or i != j) else 0.0 for j in range(B)] for i in range(B)]
    return [[v / sum(row) for v in row] for row in k]


@pytest.mark.parametrize("reduction, divisor", [("batchmean", B), ("mean", B * B)])
def test_pkt_paper_leaves_self_pairs_out_benchmark_keeps_them(reduction, divisor):
    eps = 1e-7
    for self_pairs in (False, True):
        ps, pt = _pkt_conditionals(S, self_pairs), _pkt_conditionals(T, self_pairs)
        total = sum(pt[i][j] * (math.log(pt[i][j] + eps) - math.log(ps[i][j] + eps))
                    for i in range(B) for j in range(B) if self_pairs or i != j)
        _close(pkt_loss(S, T, reduction=reduction, include_diagonal=self_pairs), total / divisor, rtol=1e-7)


def test_pkt_method_with_include_diagonal_is_the_benchmark_loss_times_its_weight():
    ps, pt = _pkt_conditionals(S, True), _pkt_conditionals(T, True)
    bench = sum(pt[i][j] * math.log((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7))  # PKT.py:40, mean over B^2
                for i in range(B) for j in range(B)) / B**2
    _close(PKT(*_models(), include_diagonal=True).distill([S], [T], {})["pkt"], 30000 * bench, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ CC


def test_cc_kernel_form_is_the_papers_taylor_rbf_correlation_congruence():
    gamma, order = 0.4, 2
    t3 = T[:, 1:]  # the kernel form allows different widths
    u, v = [_unit(S[i]) for i in range(B)], [_unit(t3[i]) for i in range(B)]

    def corr(w, i, j):
        m = float(w[i] @ w[j])
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * m**p for p in range(order + 1))

    expected = sum((corr(u, i, j) - corr(v, i, j)) ** 2 for i in range(B) for j in range(B)) / B**2
    _close(cc_loss(S, t3, gamma, order), expected)


def test_cc_delta_product_is_the_benchmarks_simplified_loss():
    t3 = T[:, :3]
    delta = [[abs(float(S[i, d] - t3[i, d])) for d in range(3)] for i in range(B)]
    expected = sum(sum(delta[i][d] * delta[i + 1][d] for d in range(3)) for i in range(B - 1)) / (B - 1)  # CC.py:15-16
    _close(cc_loss(S, t3, form="delta_product"), expected)
    with pytest.raises(ValueError, match="form must be one of"):
        cc_loss(S, t3, form="simplified")


def test_cc_method_delta_product_runs_on_unnormalised_linear_embeddings():
    method = CC(*_models(), weight=0.02, form="delta_product", feat_dim=3)
    method.build([S], [T])
    method.double()
    es = (S @ method.embed_s.weight.T + method.embed_s.bias).detach()  # RepDistiller LinearEmbed: no normalisation
    et = (T @ method.embed_t.weight.T + method.embed_t.bias).detach()
    delta = (es - et).abs()
    expected = sum(float((delta[i] * delta[i + 1]).sum()) for i in range(B - 1)) / (B - 1)
    _close(method.distill([S], [T], {})["cc"], 0.02 * expected)


# ------------------------------------------------------------------------------------------------ FT

FS, FT_T = _randn(3, 4, 2, 2, seed=5), _randn(3, 4, 2, 2, seed=6)


def test_ft_paper_normalises_the_whole_factor_benchmark_reduces_channels_first():
    flat_s, flat_t = [_unit(FS[b].flatten()) for b in range(3)], [_unit(FT_T[b].flatten()) for b in range(3)]
    paper = sum(float((flat_s[b] - flat_t[b]).abs().sum()) for b in range(3)) / 3
    _close(ft_loss(FS, FT_T), paper)
    _close(ft_loss(FS, FT_T, reduction="mean"), paper / 16)

    def squared_mean_map(f, b):  # FT.py:31: f.pow(2).mean(1), flattened, L2-normalised
        return _unit(torch.stack([sum(f[b, c, h, w] ** 2 for c in range(4)) / 4 for h in range(2) for w in range(2)]))

    bench = sum(float((squared_mean_map(FS, b) - squared_mean_map(FT_T, b)).abs().sum()) for b in range(3)) / (3 * 4)
    _close(ft_loss(FS, FT_T, reduction="mean", reduce_channels=True), bench)


def test_ft_method_benchmark_conventions_reach_the_loss_and_drop_the_paraphrasers_batchnorm():
    method = FT(*_models(), reduce_channels=True, paraphraser_bn=False, weight=200.0)
    method.build([FS], [FT_T])
    method.double().eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.paraphraser.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in method.translator.modules())  # the benchmark's Translator has BN
    fs, ft = method.translator(FS), method.paraphraser.encoder(FT_T)
    a, b = nn.functional.normalize(fs.pow(2).mean(1).flatten(1)), nn.functional.normalize(ft.pow(2).mean(1).flatten(1))
    _close(method.distill([FS], [FT_T], {})["ft"], 200 * (a - b).abs().mean())


# ------------------------------------------------------------------------------------------------ LS-KD


def test_logit_standardization_population_std_by_default_sample_std_with_correction_one():
    z = _randn(2, 5, seed=7)
    for correction, divisor in ((0, 5), (1, 4)):
        for b in range(2):
            mean = sum(float(v) for v in z[b]) / 5
            std = math.sqrt(sum((float(v) - mean) ** 2 for v in z[b]) / divisor)
            expected = [(float(v) - mean) / (std + 1e-7) for v in z[b]]
            _close(standardize(z, correction=correction)[b], torch.tensor(expected, dtype=DT))


# ------------------------------------------------------------------------------------------------ presets

# RepDistiller's settings per table row, from scripts/run_cifar_distill.sh (-b), train_student.py (defaults:
# -r 1, --kd_T 4, feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, init_epochs 30) and distiller_zoo.
BENCHMARK = {
    "crd/kd": {"temperature": 4.0, "alpha": 0.9, "logit_standardization": False},  # -r 0.1 -a 0.9
    "crd/fitnet": {"stages": 1, "weight": 100.0, "ce_weight": 1.0, "kd_weight": 0.0, "regressor_relu": True,
                   "regressor": "convreg"},
    "at": {"weight": 1000.0, "p": 2.0},
    "sp": {"weight": 3000.0},
    "crd/cc": {"weight": 0.02, "form": "delta_product", "feat_dim": 128},
    "vid": {"weight": 1.0, "init_var": 5.0, "eps": 1e-5},
    "crd/rkd": {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "include_diagonal": True},
    "crd/pkt": {"weight": 30000.0, "include_diagonal": True},
    "crd/ab": {"weight": 0.003, "margin": 1.0, "init_epochs": 30,  # ABLoss: 2^(i-n+1) / bsz * 3 / 1000 in the init
               "connector": "convreg"},
    "crd/ft": {"weight": 200.0, "p": 1.0, "rate": 0.5, "init_epochs": 30, "reduce_channels": True,
               "paraphraser_bn": False, "paraphraser_lr": 0.01},  # helper/pretrain.py: 0.01 for ResNet/WRN students
    "crd/ft_vgg": {"weight": 200.0, "reduce_channels": True, "paraphraser_bn": False, "paraphraser_lr": None},
    "fsp": {"weight": 1.0, "init_epochs": 30},  # init: the plain sum of the per-pair means; then CE only
    "nst": {"weight": 50.0},
    "crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "kd_weight": 0.0},
    "crd/crd_kd": {"weight": 0.8, "kd_weight": 1.0, "temperature": 4.0},
    "crd/ofd": {"weight": 1e-3, "align": "pool"},  # mdistiller's OFD, the table's row
}
SAME_ARCHITECTURE_FSP = {"resnet110_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "resnet56_resnet20",
                         "vgg13_vgg8", "wrn_40_2_wrn_16_2"}  # Table 1, FSP N/A for wrn_40_1; Table 2 has no FSP


def _rows():
    rows = {}
    for path in files("kdrun.conf").joinpath("experiment", "crd").iterdir():
        (command,) = [line for line in path.read_text().splitlines() if line.startswith("#   kdrun -m experiment=crd/")]
        rows[path.name[:-5]] = command.split()[4][len("method="):].split(",")
    return rows


def test_every_crd_preset_runs_each_benchmark_method_under_its_benchmark_config():
    rows = _rows()
    assert len(rows) == 11
    for pair, methods in rows.items():
        table = set(BENCHMARK) - ({"fsp"} if pair not in SAME_ARCHITECTURE_FSP else set())
        table -= {"crd/ft"} if pair.endswith("_vgg8") else {"crd/ft_vgg"}  # the init stage's rate: the row's
        assert table <= set(methods), (pair, table - set(methods))
        assert not {"kd", "fitnet", "cc", "rkd", "pkt", "ft", "ab", "ofd"} & set(methods), pair  # paper conventions


def _check(cfg, expected):
    for key, value in expected.items():
        assert cfg.method[key] == value, (key, cfg.method[key], value)
    if "kd_weight" not in expected and "alpha" not in expected:
        assert cfg.method.kd_weight == 0.0  # -a 0
    if "alpha" not in expected:
        assert cfg.method.ce_weight == 1.0  # -r 1


@pytest.mark.parametrize("method", sorted(BENCHMARK))
def test_crd_method_configs_resolve_to_the_benchmarks_conventions_and_weights(method):
    _check(make_cfg("experiment=crd/resnet32x4_resnet8x4", f"method={method}"), BENCHMARK[method])


@pytest.mark.slow
def test_every_crd_cell_resolves_to_the_benchmarks_conventions_and_weights():
    for pair, methods in _rows().items():
        for method in set(methods) & set(BENCHMARK):
            _check(make_cfg(f"experiment=crd/{pair}", f"method={method}"), BENCHMARK[method])


def test_plain_methods_keep_the_papers_conventions():
    for method, key, paper in (("rkd", "include_diagonal", False), ("pkt", "include_diagonal", False),
                               ("cc", "form", "kernel"), ("ft", "reduce_channels", False), ("ft", "paraphraser_bn", True),
                               ("fitnet", "regressor_relu", None), ("fitnet", "regressor", "paper"),
                               ("ab", "connector", "paper"), ("ofd", "align", "resolution"),
                               ("kd", "ls_std_correction", 0)):
        assert make_cfg(f"method={method}").method[key] == paper, (method, key)


@pytest.mark.parametrize("method, extra", [("crd/rkd", ["schedule.batch_size=32"]), ("crd/pkt", []), ("crd/cc", []),
                                           ("crd/ft", ["method.init_epochs=1"]), ("crd/fitnet", []),
                                           ("crd/ab", ["method.init_epochs=1"])])
def test_benchmark_conventions_train_end_to_end(method, extra, tmp_path):
    summary = run(make_cfg("dataset=digits", "schedule.batch_size=256", "schedule.epochs=2", "teacher.epochs=1",
                           "trainer.max_steps=7", f"method={method}", *extra), tmp_path, method.replace("/", "_"))
    assert summary["steps"] == 7 and math.isfinite(summary["test/acc"])


@pytest.mark.parametrize("form, guided, conv", [("convreg", "layer2", torch.nn.ConvTranspose2d),
                                                ("paper", "layer1", torch.nn.Conv2d)])
def test_fitnets_convreg_doubles_a_guided_map_half_the_hints_size_as_the_benchmark_does(form, guided, conv):
    """resnet32x4 -> shufflenetv1 at 32 px: the hint (the teacher's layer2) is 16x16, the student's layer2 8x8.
    RepDistiller's ConvReg guides that layer2 through a 4x4 stride-2 transposed conv, BN, ReLU; the paper's
    regressor (a valid conv, which only shrinks) guides the student's 16x16 layer1 instead."""
    from kdrun import models
    from kdrun.methods.fitnet import FitNet

    torch.manual_seed(0)
    student, teacher = models.create("shufflenetv1", 100, in_chans=3), models.create("resnet32x4", 100, in_chans=3)
    method = FitNet(student, teacher, stages=1, regressor_relu=True, regressor=form)
    method.setup(SimpleNamespace(in_chans=3, image_size=32))
    assert method.s_hooks.specs == [guided] and method.t_hooks.specs == ["layer2"]
    (layer,) = [m for m in method.regressor if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert type(layer) is conv
    if form == "paper":
        return
    assert (layer.kernel_size, layer.stride, layer.padding) == ((4, 4), (2, 2), (1, 1))
    images = _randn(4, 3, 32, 32, seed=11).float()
    seen = {}
    for name, model in (("guided", student), ("hint", teacher)):  # each layer2's output, read by a plain hook
        model.layer2.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out.detach()))
    losses, _ = method.training_step({"image": images, "label": torch.arange(4)})
    guided_map, hint = seen["guided"], seen["hint"]
    up = torch.nn.functional.conv_transpose2d(guided_map, layer.weight, layer.bias, stride=2, padding=1)
    mean, var = up.mean((0, 2, 3), keepdim=True), up.var((0, 2, 3), unbiased=False, keepdim=True)
    regressed = ((up - mean) / (var + 1e-5).sqrt()).relu()  # BN in training mode at its initial scale and shift
    assert up.shape == hint.shape == (4, 128, 16, 16)
    torch.testing.assert_close(losses["hint"], 100.0 * ((regressed - hint) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_abs_benchmark_connector_is_the_identity_for_equal_shapes_and_convreg_across_sizes():
    """RepDistiller's AB Connector: feat[1:-1] paired in order; resnet56 -> resnet20 has equal shapes, so no
    connector at all (the paper's 1x1 conv + BN otherwise); resnet32x4 -> shufflenetv1 pairs 32, 16, 8 px
    teacher maps with 16, 8, 4 px student maps, each through a 4x4 stride-2 transposed conv and BN, no ReLU."""
    from kdrun import models
    from kdrun.methods.ab import AB

    torch.manual_seed(0)
    data = SimpleNamespace(in_chans=3, image_size=32)
    same = AB(models.create("resnet20", 100, in_chans=3), models.create("resnet56", 100, in_chans=3), connector="convreg")
    same.setup(data)
    assert all(isinstance(c, nn.Identity) for c in same.connectors) and len(same.connectors) == 3
    paper = AB(models.create("resnet20", 100, in_chans=3), models.create("resnet56", 100, in_chans=3))
    paper.setup(data)
    assert all(isinstance(c[0], nn.Conv2d) and c[0].kernel_size == (1, 1) for c in paper.connectors)
    cross = AB(models.create("shufflenetv1", 100, in_chans=3), models.create("resnet32x4", 100, in_chans=3),
               connector="convreg")
    cross.setup(data)
    assert len(cross.connectors) == 3  # the paper's form pairs by resolution and keeps two of them
    for c in cross.connectors:
        assert [type(m) for m in c] == [nn.ConvTranspose2d, nn.BatchNorm2d]
        assert (c[0].kernel_size, c[0].stride, c[0].padding) == ((4, 4), (2, 2), (1, 1))
    images = _randn(2, 3, 32, 32, seed=12).float()
    cross.on_stage_start(cross.stages(1)[0], None)
    losses, _ = cross.training_step({"image": images, "label": torch.arange(2)})
    with torch.no_grad():
        (_, s_feats), (_, t_feats) = cross.s_hooks(images), cross.t_hooks(images)
    expected = 0.0
    for i, (s, t, c) in enumerate(zip(s_feats, t_feats, cross.connectors)):
        up = torch.nn.functional.conv_transpose2d(s, c[0].weight, c[0].bias, stride=2, padding=1)
        mean, var = up.mean((0, 2, 3), keepdim=True), up.var((0, 2, 3), unbiased=False, keepdim=True)
        r = (up - mean) / (var + 1e-5).sqrt()
        boundary = (t > 0).float() * (1.0 - r).clamp(min=0) + (t <= 0).float() * (1.0 + r).clamp(min=0)
        expected += 2.0 ** (i - 3 + 1) * (boundary ** 2).sum() / 2  # summed over neurons, averaged over the batch
    torch.testing.assert_close(losses["ab"], 0.003 * expected, rtol=1e-4, atol=1e-6)


def test_ofds_table_row_pools_each_teacher_map_to_its_student_maps_size():
    """mdistiller's OFD (the CRD table's row): resnet32x4 -> shufflenetv1 pairs the 32, 16, 8 px teacher stages
    with the 16, 8, 4 px student stages in order, each teacher map averaged over 2x2 blocks; the paper's pairing by
    resolution keeps two pairs (16 and 8 px)."""
    from kdrun import models
    from kdrun.losses import ofd_loss
    from kdrun.methods.ofd import OFD

    torch.manual_seed(0)
    data = SimpleNamespace(in_chans=3, image_size=32)
    resolution = OFD(models.create("shufflenetv1", 100, in_chans=3), models.create("resnet32x4", 100, in_chans=3))
    resolution.setup(data)
    assert len(resolution.connectors) == 2
    pool = OFD(models.create("shufflenetv1", 100, in_chans=3), models.create("resnet32x4", 100, in_chans=3),
               align="pool", ce_weight=0.0)
    pool.setup(data)
    images = _randn(2, 3, 32, 32, seed=13).float()
    losses, _ = pool.training_step({"image": images, "label": torch.arange(2)})
    with torch.no_grad():
        (_, s_feats), (_, t_feats) = pool.s_hooks(images), pool.t_hooks(images)
    assert [t.shape[2] for t in t_feats] == [32, 16, 8] and [s.shape[2] for s in s_feats] == [16, 8, 4]
    expected = 0.0
    for i, (s, t, r) in enumerate(zip(s_feats, t_feats, pool.connectors)):
        b, c, h, w = t.shape
        pooled = t.view(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
        expected += ofd_loss(r(s), pooled, getattr(pool, f"margin_{i}")) / 2 ** (3 - i - 1)
    torch.testing.assert_close(losses["ofd"], 1e-3 * expected, rtol=1e-4, atol=1e-7)


def test_fts_paraphraser_trains_at_its_own_learning_rate_then_the_student_at_the_schedules(tmp_path):
    """RepDistiller's init stage trains FT's paraphraser at lr 0.01 for a ResNet student (crd/ft), whatever the
    row's rate; the student's stage then runs at the schedule's (0.05 here, a step schedule: constant)."""
    run(make_cfg("dataset=digits", "schedule=sgd_step", "schedule.batch_size=256", "schedule.epochs=1",
                 "teacher.epochs=1", "method=crd/ft", "method.init_epochs=1", "trainer.log_every=1"),
        tmp_path, "crd_ft")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [(r["train/stage"], r["train/lr"]) for r in rows if "train/lr" in r]  # stage 0: the paraphraser's
    assert {lr for stage, lr in lrs if stage == 0} == {0.01}
    assert {lr for stage, lr in lrs if stage == 1} == {0.05}
