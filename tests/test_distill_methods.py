"""The distillation methods of kdrun/methods end to end on scikit-learn's digits, and what each must guarantee:
gradients reach the student (and its connectors) but never the teacher, multi-stage methods train only what
their stage names, state that must survive a resume is in the state dict, bad input is one clear error."""

import json

import pytest
import torch
from hydra.utils import instantiate

from conftest import make_cfg
from kdrun import data as kdata, models
from kdrun.engine import Engine
from kdrun.errors import KdrunError
from kdrun.run import run

# 256-image batches: 5 steps per digits epoch; 7 steps cover a one-epoch first stage and two steps of the next
FAST = ["dataset=digits", "schedule.batch_size=256", "schedule.epochs=2", "teacher.epochs=1", "trainer.max_steps=7"]
EQUAL_WIDTHS = ["student=cnn", "student.kwargs.width=32"]  # FSP and KD-SVD compare channels one to one
EXTRA = {
    "fitnet": ["method.hint_epochs=1"], "ab": ["method.init_epochs=1"], "fsp": ["method.init_epochs=1", *EQUAL_WIDTHS],
    "ft": ["method.init_epochs=1"], "kdsvd": EQUAL_WIDTHS, "crd": ["method.nce_k=64", "method.kd_weight=1"],
    "multi_teacher": ["teachers=[cnn,cnn_small]"], "kd": ["method.logit_standardization=true", "method.kd_weight=9"],
    "dkd": ["method.logit_standardization=true"], "dist": ["method.logit_standardization=true"],
    "rkd": ["schedule.batch_size=32"],  # RKD's angle term costs O(B^3)
}
FEATURE_METHODS = ["fitnet", "at", "sp", "rkd", "pkt", "cc", "vid", "nst", "kdsvd", "ft", "ab", "fsp", "crd", "ofd",
                   "reviewkd"]
LOSSES = {"fitnet": {"hint", "ce", "kd"}, "ab": {"ab", "ce"}, "fsp": {"fsp", "ce"},
          "ft": {"reconstruction", "ce", "ft"}, "rkd": {"ce", "rkd_d", "rkd_a"}, "crd": {"ce", "kd", "crd"},
          "kd": {"ce", "kd"}, "multi_teacher": {"ce", "kd"}}


def _cfg(method, *extra):
    return make_cfg(*FAST, f"method={method}", *EXTRA.get(method, []), *extra)


@pytest.mark.parametrize("method", [*FEATURE_METHODS, "kd", "dkd", "dist", "multi_teacher"])
def test_every_method_trains_end_to_end(method, tmp_path):
    summary = run(_cfg(method), tmp_path, method)
    assert summary["steps"] == 7 and 0.0 <= summary["test/acc"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seen = {k[len("train/"):] for r in rows for k in r if k.startswith("train/")}
    expected = LOSSES.get(method, {"ce", method})
    assert expected <= seen, (expected, seen)
    if method in ("fitnet", "ab", "fsp", "ft"):
        assert [r["train/stage"] for r in rows if "train/stage" in r][-1] == 1  # the second stage was reached
    if method == "multi_teacher":
        assert summary["teacher"] == "cnn+cnn" and summary["teacher/test_acc"] is not None


def _method(method, *extra):
    """The method of `method`'s config on digits, with untrained models, set up as kdrun.run does."""
    cfg = _cfg(method, *extra)
    data = kdata.build(cfg.dataset)
    torch.manual_seed(0)
    teacher, student = models.build(cfg.teacher, data), models.build(cfg.student, data)
    m = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    m.setup(data)
    loader = kdata.Loaders(data, m.batch_spec, 64, 64, "cpu", seed=0).train()
    return m, next(iter(loader)), cfg, data


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_gradient_reaches_what_the_stage_trains_and_never_the_teacher(method):
    m, batch, _, _ = _method(method, "method.kd_weight=0.5")
    m.train()
    for stage in m.stages(2):
        m.on_stage_start(stage, None)
        m.zero_grad(set_to_none=True)
        losses, _ = m.training_step(batch)
        sum(losses.values()).backward()
        trained = {id(p) for p in (stage.params if stage.params is not None else m.parameters())}
        with_grad = [n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert with_grad and {n for n, p in m.named_parameters() if id(p) in trained} >= set(with_grad), stage.name
        assert all(p.grad is None for p in m.teacher.parameters()), stage.name
        if stage.name != "paraphraser":  # FT's first stage trains the teacher-side auto-encoder only
            assert any(n.startswith("student.") for n in with_grad), stage.name


def test_fitnet_stage_one_trains_only_the_lower_student_and_the_regressor(tmp_path):
    m, _, cfg, data = _method("fitnet")
    loaders = kdata.Loaders(data, m.batch_spec, 256, 512, "cpu", seed=0)
    engine = Engine(m, loaders, cfg.schedule, cfg.trainer, device="cpu")
    train = loaders.train()
    engine.max_steps = len(train)  # exactly stage 1 (hint_epochs=1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    engine.fit()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    lower = ("student.layer1.", "student.layer2.")  # kdrun's cnn: the guided layer is the middle stage, layer2
    assert {n for n in before if n.startswith(lower)} <= changed
    assert {n for n in before if n.startswith("regressor.")} <= changed
    assert changed <= {n for n in before if n.startswith((*lower, "regressor."))}  # layer3, fc, teacher unchanged
    trained = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in m.guided_params} | {id(p) for p in m.regressor.parameters()}

    engine.max_steps = 2 * len(train)  # then stage 2: the whole student with KD, the regressor dropped
    regressor = {n: p.detach().clone() for n, p in m.regressor.named_parameters()}
    head = m.student.fc.weight.detach().clone()
    engine.fit()
    assert not torch.equal(m.student.fc.weight, head)
    assert all(torch.equal(p, regressor[n]) for n, p in m.regressor.named_parameters())


def test_fitnet_anneals_lambda_and_has_a_one_stage_variant():
    m, batch, _, _ = _method("fitnet")
    stages = m.stages(5)
    assert [s.name for s in stages] == ["hint", "kd"]
    m.on_stage_start(stages[1], None)
    m.epoch = 1  # the first epoch of stage 2
    assert m.kd_lambda() == pytest.approx(4.0)
    m.epoch = 1 + 4
    assert m.kd_lambda() == pytest.approx(1.0)
    one, _, _, _ = _method("fitnet", "method.stages=1", "method.kd_weight=1")
    assert [s.name for s in one.stages(5)] == ["train"]
    losses, _ = one.training_step(batch)
    assert set(losses) == {"ce", "kd", "hint"}


def test_crd_keeps_its_memory_in_the_state_dict_and_draws_negatives_of_other_classes():
    m, batch, _, data = _method("crd")
    m.train()
    state = m.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(state) and state["memory_s"].shape == (len(data.splits.train), 128)
    negatives = m.negatives(batch["index"])
    assert negatives.shape == (len(batch["index"]), 64)
    assert (m.labels[negatives] != m.labels[batch["index"]].unsqueeze(1)).all()
    before = m.memory_s.clone()
    m.training_step(batch)
    assert (m.z > 0).all() and not torch.equal(m.memory_s[batch["index"]], before[batch["index"]])
    fresh, _, _, _ = _method("crd")
    fresh.load_state_dict(m.state_dict())  # a resumed run gets the banks and the constants back
    assert torch.equal(fresh.memory_t, m.memory_t) and torch.equal(fresh.z, m.z)


@pytest.mark.parametrize("bank", [100, 10_000])  # the dense product with the whole bank, and the gathered rows
def test_crd_scores_pair_each_embedding_with_the_bank_rows_drawn_for_it(bank):
    from kdrun.methods.crd import CRD

    torch.manual_seed(0)
    memory, v, idx = torch.randn(bank, 8), torch.randn(4, 8), torch.randint(0, bank, (4, 33))
    want = torch.stack([torch.stack([memory[j] @ v[b] for j in row]) for b, row in enumerate(idx)])
    torch.testing.assert_close(CRD.scores(memory, v, idx), want)


@pytest.mark.parametrize("nce_k", [64, 1024])  # the benchmark's gather of bank rows, and the dense product
def test_crd_trains_through_either_scoring_of_its_memory_bank(nce_k):
    m, batch, _, _ = _method("crd", f"method.nce_k={nce_k}")
    m.train()
    losses, _ = m.training_step(batch)  # also updates the banks, before the backward
    sum(losses.values()).backward()
    assert m.embed_s.weight.grad is not None and m.embed_s.weight.grad.abs().sum() > 0


def test_ofd_measures_its_margins_once():
    m, batch, _, _ = _method("ofd")
    m.train()
    m.training_step(batch)
    first = [getattr(m, f"margin_{i}").clone() for i in range(3)]
    assert all((x < 0).all() for x in first)
    m.training_step({**batch, "image": batch["image"] * 3})
    assert all(torch.equal(x, getattr(m, f"margin_{i}")) for i, x in enumerate(first))


@pytest.mark.parametrize("method, extra, message", [
    ("fsp", ["student.kwargs.width=12"], r"fsp matches .* channels are \[\(1, 1\), \(12, 32\)"),
    ("kdsvd", ["student.kwargs.width=12"], "kdsvd compares singular vectors"),
    ("at", ["student.feature_layers=[layer9]"], r"student has no module 'layer9'.*layer1\.0"),
    ("at", ["student.feature_layers=[layer1,layer2]"], "2 student and 3 teacher layers"),
    ("fitnet", ["student.feature_layers=[layer3]", "teacher.feature_layers=[layer1]"], "regressor maps a larger"),
    ("multi_teacher", [], "name its teachers with teachers="),
    ("fitnet", ["method.stages=3"], "method.stages=3"),
])
def test_bad_input_is_one_clear_error(method, extra, message):
    with pytest.raises(KdrunError, match=message):
        _method(method, *extra)


def test_unknown_teacher_preset_is_refused(tmp_path):
    with pytest.raises(KdrunError, match="not a teacher preset; use one of"):
        run(_cfg("multi_teacher", "teachers=[cnn,nope]"), tmp_path, "multi_teacher")


def test_an_ensemble_is_refused_by_a_method_that_takes_one_teacher(tmp_path):
    """kd would temper the ensemble's averaged log-probabilities again: not Hinton's average of tempered ones."""
    with pytest.raises(KdrunError, match="teachers=.* use method=multi_teacher"):
        run(_cfg("kd", "teachers=[cnn,cnn_small]"), tmp_path, "kd")
    assert not (tmp_path / "checkpoints").exists()


def test_dkd_says_when_its_warm_up_outlasts_the_schedule(caplog):
    from kdrun.methods.base import Stage
    from kdrun.methods.dkd import DKD

    method = DKD(models.create("cnn", 10, in_chans=1, width=4), models.create("cnn", 10, in_chans=1, width=4))
    with caplog.at_level("WARNING"):
        method.on_stage_start(Stage("train", 20), None)
        assert not caplog.records
        method.on_stage_start(Stage("train", 4), None)
    assert "end at 0.20 of their weight" in caplog.text  # epochs 1..4 of a 20-epoch ramp


def _crd_rows() -> dict[str, list[str]]:
    """Each CRD benchmark pair preset and the methods of the one-multirun command its header gives."""
    from importlib.resources import files

    rows = {}
    for path in files("kdrun.conf").joinpath("experiment", "crd").iterdir():
        (command,) = [line for line in path.read_text().splitlines() if line.startswith("#   kdrun -m experiment=crd/")]
        experiment, methods = command.split()[3:5]
        assert experiment == f"experiment=crd/{path.name[:-5]}" and methods.startswith("method=")
        rows[path.name[:-5]] = methods[len("method="):].split(",")
    return dict(sorted(rows.items()))


def _check_crd_cells(cells):
    for pair, method in cells:
        cfg = make_cfg(f"experiment=crd/{pair}", f"method={method}")
        assert cfg.dataset.name == "cifar100" and cfg.schedule.epochs == 240
        assert f"{cfg.teacher.name}_{cfg.student.name}" == pair and cfg.method._target_
        small = cfg.student.name in ("mobilenetv2", "shufflenetv1", "shufflenetv2")
        assert cfg.schedule.optimizer.lr == (0.01 if small else 0.05)


def test_crd_benchmark_rows_compose_with_their_published_settings():
    """One whole row and every row's cells with benchmark settings (all 200 cells: the slow test below)."""
    rows = _crd_rows()
    assert len(rows) == 11 and all(len(methods) >= 18 for methods in rows.values())
    _check_crd_cells([("resnet32x4_resnet8x4", m) for m in rows["resnet32x4_resnet8x4"]]
                     + [(pair, m) for pair, methods in rows.items() for m in methods if m.startswith("crd/")])
    fitnet = make_cfg("experiment=crd/resnet32x4_resnet8x4", "method=crd/fitnet").method
    assert fitnet.stages == 1 and fitnet.weight == 100
    kd = make_cfg("experiment=crd/resnet32x4_resnet8x4", "method=crd/kd").method
    assert kd.temperature == 4 and kd.alpha == 0.9
    assert "crd/dkd_beta2" in rows["resnet56_resnet20"] and "dkd" in rows["resnet32x4_resnet8x4"]
    assert make_cfg("method=crd/dkd_beta6").method.beta == 6
    assert make_cfg("method=crd/crd_kd").method.kd_weight == 1


@pytest.mark.slow
def test_every_crd_benchmark_cell_composes():
    _check_crd_cells([(pair, m) for pair, methods in _crd_rows().items() for m in methods])


@pytest.mark.parametrize("pair, method", [("resnet32x4_shufflenetv2", "at"), ("wrn_40_2_shufflenetv1", "ofd"),
                                          ("vgg13_mobilenetv2", "crd/fitnet"), ("wrn_40_2_shufflenetv1", "reviewkd")])
def test_cross_architecture_presets_pair_their_features(pair, method):
    cfg = make_cfg(f"experiment=crd/{pair}", f"method={method}")
    fake = kdata.InMemory(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8))
    data = kdata.Data("cifar100", kdata.Splits(fake, fake, 100, 3, 32), [0.5] * 3, [0.5] * 3, {})
    teacher, student = models.build(cfg.teacher, data), models.build(cfg.student, data)
    m = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    m.setup(data)
    m.train()
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.arange(4), "index": torch.arange(4)}
    losses, _ = m.training_step(batch)
    assert all(torch.isfinite(v) for v in losses.values())
