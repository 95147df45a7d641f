"""Pseudo-label, Noisy Student, Data Distillation and Meta Pseudo Labels: the algorithms, then end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg
from kdrun import data as kdata, models
from kdrun.data.loaders import Normalize
from kdrun.engine import Engine
from kdrun.errors import KdrunError
from kdrun.methods.data_distillation import DataDistillation, zoom
from kdrun.methods.mpl import MPL
from kdrun.methods.noisy_student import NoisyStudent
from kdrun.methods.online_pseudo_label import OnlinePseudoLabel, alpha
from kdrun.run import run
from kdrun.teacher import cache_key


def _cnn(**kwargs):
    return models.create("cnn", 10, in_chans=1, width=4, **kwargs)


class _Fixed:
    """A loader factory whose training data is a fixed list of batches."""

    def __init__(self, batches):
        self.batches = batches

    def train(self, selection=None):
        return self.batches


def _engine(method, loaders, **optimizer):
    """An engine as at the start of its first stage (SGD, lr 0.05, Nesterov momentum 0.9), to step `method` by hand."""
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    sched = OmegaConf.merge(cfg.schedule, {"epochs": 1}, {"optimizer": optimizer})
    engine = Engine(method, loaders, sched, cfg.trainer)
    engine.train_loader = loaders.train()
    return engine


def _digits_split():
    return kdata.build(make_cfg("dataset=digits", "dataset.labeled_per_class=5").dataset)


def test_noisy_students_pseudo_labels_come_from_the_un_noised_teacher():
    torch.manual_seed(0)
    data = _digits_split()
    teacher = _cnn(dropout=0.5)  # BatchNorm and dropout: both would change its outputs in train mode
    method = NoisyStudent(_cnn(), teacher, iterations=1, threshold=0.0, randaugment={"num_ops": 2, "magnitude": 9})
    engine = _engine(method, kdata.Loaders(data, method.batch_spec, 16, 1000, "cpu", seed=0))
    calls = []
    teacher.register_forward_hook(lambda m, inputs, out: calls.append((m.training, inputs[0].clone())))
    method.train()
    method.on_stage_start(method.stages(1)[0], engine.loop)
    method.make_labels(engine.loop)
    assert calls and not any(training for training, _ in calls)
    clean = Normalize(data.mean, data.std, "cpu")(data.labeled_split.unlabeled.images)
    labelled = torch.cat([x for _, x in calls if len(x) != len(data.splits.test)])
    assert torch.equal(labelled, clean)  # no augmentation
    with torch.no_grad():
        assert torch.allclose(method.targets, F.softmax(teacher.eval()(clean), 1), atol=1e-6)
    batch = next(iter(engine.train_loader))  # ... while the student's images are noised
    assert not torch.allclose(batch["unlabeled_image"], clean[batch["unlabeled_index"]])


def test_noisy_student_warns_of_a_student_smaller_than_its_teacher(caplog):
    with caplog.at_level("WARNING"):
        NoisyStudent(_cnn(), _cnn(), iterations=1)
        assert not caplog.records
        NoisyStudent(_cnn(), models.create("cnn", 10, in_chans=1, width=8), iterations=1)
    assert "smaller than the teacher" in caplog.text


def test_noisy_student_balances_classes_and_the_student_becomes_the_teacher():
    method = NoisyStudent(_cnn(), _cnn(), iterations=2, threshold=0.3)
    probs = torch.tensor([[0.9, 0.1, 0.0]] * 3 + [[0.6, 0.4, 0.0]] + [[0.2, 0.8, 0.0]] + [[0.25, 0.25, 0.5]]
                         + [[0.34, 0.33, 0.33]] * 0 + [[0.1, 0.1, 0.2]])
    w = method.select(probs)  # kept: 4 of class 0, 1 of class 1, 1 of class 2, one below 0.3; K = 6 / 3 = 2
    assert w.tolist() == [1, 1, 0, 0, 2, 2, 0]  # class 0: its 2 most confident; classes 1, 2: duplicated x2
    first = {k: v.clone() for k, v in method.student.state_dict().items()}
    stages = method.stages(1)
    method.on_stage_start(stages[0], None)
    assert method.labeler() is method.teacher
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)  # "training"
    trained = {k: v.clone() for k, v in method.student.state_dict().items()}
    method.on_stage_start(stages[1], None)
    assert method.labeler() is method.previous and int(method.iteration) == 2
    assert all(torch.equal(method.previous.state_dict()[k], v) for k, v in trained.items())
    assert all(torch.equal(method.student.state_dict()[k], v) for k, v in first.items())
    method.on_stage_start(stages[1], None)  # a resumed iteration does not swap again
    assert all(torch.equal(method.previous.state_dict()[k], v) for k, v in trained.items())


def test_student_noise_reaches_the_model():
    data = kdata.Data("x", kdata.Splits(None, None, 10, 1, 28), [0.3], [0.3], {})
    assert models.build(make_cfg("student.drop_rate=0.5").student, data).dropout.p == 0.5  # cnn's `dropout`
    with pytest.raises(KdrunError, match="does not take drop_path_rate"):
        models.build(make_cfg("student.drop_path_rate=0.2").student, data)


def test_data_distillation_ensembles_zooms_and_flips():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(zoom(x, 1.0), x)
    assert zoom(x, 2.0)[0, 0, 4, 4].item() == pytest.approx(8 * 3.75 + 3.75)  # pixel (4, 4) shows (3.75, 3.75)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    method = DataDistillation(model, model, scales=[1.0, 2.0], flip=True)
    expected = torch.stack([F.softmax(model(v), 1) for v in (x, x.flip(3), zoom(x, 2.0), zoom(x, 2.0).flip(3))]).mean(0)
    assert torch.allclose(method.predict(model, x), expected)


class _SecondFeature(nn.Module):
    """A teacher that sees only the second input feature (no bias): its labeled CE on x_l = (1, 0) is 0-gradient."""

    def __init__(self, logits):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(logits).view(2, 1))

    def forward(self, x):
        return self.fc(x[:, 1:2])


@pytest.mark.parametrize("pseudo_labels", ["sample", "argmax"])
@pytest.mark.parametrize("teacher_logits, pseudo, h_expected", [
    ([1.0, 0.0], 0, 0.05 * 0.476270),   # labels x_u as y_l's class: the student's labeled loss falls, h > 0
    ([0.0, 1.0], 1, -0.05 * 0.523730),  # the other class: the labeled loss rises, h < 0
])
def test_mpl_teacher_is_reinforced_exactly_when_its_pseudo_labels_help_the_student(
        monkeypatch, teacher_logits, pseudo, h_expected, pseudo_labels):
    """x_l = (1, 0) labelled 0, x_u = (1, 1); a zero linear student. One SGD+Nesterov step (lr 0.05, momentum
    0.9) on CE(y^, S(x_u)) moves the student's logits on x_l by +-0.095 for class 0, so by hand
    h = 0.05 * <g'_l, g_u> = 0.05 * (+0.47627 | -0.52373), and the teacher's probability of y^ must rise
    exactly when h > 0 (Pham et al. 2021, Eq. 12)."""
    if pseudo_labels == "sample":  # the draw y^_u ~ T(x_u) made the teacher's mode
        monkeypatch.setattr(torch, "multinomial", lambda p, n: p.argmax(1, keepdim=True))
    student = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(student.weight)
    teacher = _SecondFeature(teacher_logits)
    method = MPL(student, teacher, randaugment=None, uda_weight=0.0, label_smoothing=0.0, unlabeled_ratio=1,
                 pseudo_labels=pseudo_labels, feedback="first_order")
    batch = {"image": torch.tensor([[1.0, 0.0]]), "label": torch.tensor([0]),
             "unlabeled_image": torch.tensor([[1.0, 1.0]]), "unlabeled_index": torch.tensor([0])}
    engine = _engine(method, _Fixed([batch]), weight_decay=0.0)
    stage = method.stages(1)[0]
    engine.optimizer, engine.scheduler = engine.make_optimizer(stage.params, 1)
    method.on_stage_start(stage, engine.loop)
    before = F.softmax(teacher(batch["unlabeled_image"]), 1)[0, pseudo].item()
    losses, metrics = method.step(batch, engine.loop)
    after = F.softmax(teacher(batch["unlabeled_image"]), 1)[0, pseudo].item()
    assert metrics["h"].item() == pytest.approx(h_expected, abs=1e-6)
    assert (after > before) == (h_expected > 0) and after != before
    assert losses["teacher_ce"].item() == pytest.approx(F.cross_entropy(torch.zeros(1, 2), torch.tensor([0])).item())


def _one_mpl_step(optimizer: dict, feedback: str, baseline: float = 0.0, steps: int = 1):
    """`steps` MPL steps of a linear student on x_l = (1, 0) labelled 0 and x_u = (1, 1) labelled 0 by the
    teacher, the student's optimizer `optimizer` (AdamW when it names no momentum, else SGD); returns the method,
    its h per step and the student's labeled loss before each step and after the last."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(2, 2, bias=False), _SecondFeature([1.0, 0.0])
    method = MPL(student, teacher, randaugment=None, uda_weight=0.0, label_smoothing=0.0, unlabeled_ratio=1,
                 pseudo_labels="argmax", feedback=feedback, feedback_baseline=baseline)
    batch = {"image": torch.tensor([[1.0, 0.0]]), "label": torch.tensor([0]),
             "unlabeled_image": torch.tensor([[1.0, 1.0]]), "unlabeled_index": torch.tensor([0])}
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine" if "momentum" in optimizer else "schedule=adamw_cosine")
    engine = Engine(method, _Fixed([batch]), OmegaConf.merge(cfg.schedule, {"epochs": 1, "optimizer": optimizer}),
                    cfg.trainer)
    engine.train_loader = engine.loaders.train()
    stage = method.stages(1)[0]
    engine.optimizer, engine.scheduler = engine.make_optimizer(stage.params, 1)
    method.on_stage_start(stage, engine.loop)
    labeled = lambda: F.cross_entropy(student(batch["image"]), batch["label"]).item()  # noqa: E731
    hs, losses = [], []
    for _ in range(steps):
        losses.append(labeled())
        hs.append(method.step(batch, engine.loop)[1]["h"].item())
    return method, hs, losses + [labeled()]


def test_mpl_feedback_is_what_the_actual_step_did_to_the_labeled_loss_for_any_optimizer():
    """`difference`: h = the labeled loss before the student's step less after it, whatever the optimizer (AdamW's
    first step moves every weight by lr, whatever the gradient's size); for plain SGD it agrees with Eq. 12's
    first-order estimate to O(lr^2); the moving-average baseline centres it."""
    for optimizer in ({"lr": 0.05, "weight_decay": 0.0},
                      {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}):
        _, (h,), (before, after) = _one_mpl_step(optimizer, "difference")
        assert h == pytest.approx(before - after, abs=1e-6) and h > 0
    plain_sgd = {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    _, (h_diff,), _ = _one_mpl_step(plain_sgd, "difference")
    _, (h_first,), _ = _one_mpl_step(plain_sgd, "first_order")
    assert h_diff == pytest.approx(h_first, rel=0.02) and h_diff != h_first
    method, hs, losses = _one_mpl_step(plain_sgd, "difference", baseline=0.5, steps=2)
    raw = [b - a for b, a in zip(losses, losses[1:])]
    m1 = 0.5 * raw[0]
    assert hs == pytest.approx([raw[0] - m1, raw[1] - (m1 + 0.5 * (raw[1] - m1))], abs=1e-6)
    assert method.h_mean.item() == pytest.approx(m1 + 0.5 * (raw[1] - m1), abs=1e-6)  # checkpointed with the method


def test_mpl_first_order_feedback_refuses_a_student_that_is_not_trained_by_sgd():
    with pytest.raises(KdrunError, match="method.feedback=first_order .* trains with AdamW; use method.feedback=difference"):
        _one_mpl_step({"lr": 0.05}, "first_order")


@pytest.mark.parametrize("option, hint", [({"pseudo_labels": "soft"}, "use sample"),
                                          ({"student_wait": 1.0}, "in \\[0, 1\\)")])
def test_mpl_rejects_a_bad_option_with_the_fix(option, hint):
    with pytest.raises(KdrunError, match=f"method.{next(iter(option))}=.*{hint}"):
        MPL(_cnn(), _cnn(), randaugment=None, **option)


def test_mpl_keeps_its_teacher_and_teacher_optimizer_in_its_state():
    def make():
        torch.manual_seed(0)
        m = MPL(_cnn(), _cnn(), randaugment=None, uda_weight=0.0)
        e = _engine(m, _Fixed([None] * 4))
        m.on_stage_start(m.stages(1)[0], e.loop)
        return m, e

    method, _ = make()
    method.teacher_optimizer.state["x"] = {"momentum_buffer": torch.ones(1)}  # as after some steps
    method.teacher_optimizer.step()
    method.teacher_scheduler.step()
    state = method.state_dict()
    assert any(k.startswith("teacher.") for k in state) and "_extra_state" in state
    fresh, _ = make()
    fresh.load_state_dict(state)
    assert fresh.teacher_scheduler.last_epoch == 1
    assert torch.equal(fresh.teacher_optimizer.state_dict()["state"]["x"]["momentum_buffer"], torch.ones(1))


def test_lees_alpha_ramps_from_t1_to_t2():
    assert [alpha(e, 3.0, 100, 600) for e in (0, 99.9, 100, 350, 600, 900)] == pytest.approx([0, 0, 0, 1.5, 3, 3])


def test_online_pseudo_label_trains_on_its_own_current_argmax_weighted_by_alpha():
    """Lee's loss on fixed tensors: CE on the labeled image plus alpha(t) times CE against the network's own argmax
    in the same forward; after a step that flips the network's prediction on u, the next pseudo label flips too."""
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.9]]))
    method = OnlinePseudoLabel(net, alpha_f=3.0, t1=1, t2=3)
    batch = {"image": torch.tensor([[0.0, 1.0]]), "label": torch.tensor([0]),
             "unlabeled_image": torch.tensor([[1.0, 1.0]]), "unlabeled_index": torch.tensor([0])}
    method.epoch = 2.0  # halfway up the ramp: alpha = 1.5
    losses, metrics = method.training_step(batch)
    logits_x, logits_u = torch.tensor([[0.0, 0.9]]), torch.tensor([[1.0, 0.9]])  # u's argmax: class 0
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits_x, torch.tensor([0])).item())
    assert losses["pseudo"].item() == pytest.approx(1.5 * F.cross_entropy(logits_u, torch.tensor([0])).item())
    assert metrics["alpha"].item() == 1.5
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.9]]))  # now u's argmax is class 1
    losses, _ = method.training_step(batch)
    assert losses["pseudo"].item() == pytest.approx(1.5 * F.cross_entropy(torch.tensor([[0.0, 0.9]]),
                                                                          torch.tensor([1])).item())


@pytest.mark.parametrize("method, extra", [
    ("offline_pseudo_label", []),
    ("pseudo_label", ["method.t1=0.25", "method.t2=0.75", "trainer.log_every=1"]),
    ("noisy_student", ["method.iterations=2", "method.threshold=0.1", "student.drop_rate=0.3"]),
    ("data_distillation", ["method.flip=false"]),
    ("mpl", ["schedule.epochs=2", "method.student_wait=0.5", "method.uda_ramp=0.5", "trainer.max_steps=9"]),
])
def test_each_method_runs_end_to_end_on_digits(tmp_path, method, extra):
    """Tiny runs: 50 labeled images (3 steps an epoch, batches of 16) beside 1387 unlabeled ones."""
    cfg = make_cfg("dataset=digits", f"method={method}", "dataset.labeled_per_class=5", "schedule=sgd_cosine",
                   "schedule.batch_size=16", "schedule.epochs=1", "trainer.max_steps=8", "teacher=cnn_small",
                   "teacher.epochs=2", *extra)
    summary = run(cfg, tmp_path, method_name=method)
    assert 0 <= summary["test/acc"] <= 1 and summary["method"] == method
    assert json.loads((tmp_path / "split.json").read_text())["num_labeled"] == 50
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if method == "noisy_student":
        assert {"iteration1/teacher_acc", "iteration1/student_acc", "iteration2/teacher_acc",
                "iteration2/student_acc"} <= set(summary)
        assert summary["iteration2/teacher_acc"] == summary["iteration1/student_acc"]
        ckpt = torch.load(tmp_path / "checkpoints" / "iteration1.pt", weights_only=True)
        assert ckpt["iteration"] == 1 and (tmp_path / "checkpoints" / "iteration2.pt").is_file()
        assert sum("noisy_student/teacher_acc" in r for r in rows) == 2
    elif method == "mpl":
        assert summary["teacher/test_acc"] is None and summary["epochs"] == 3  # wait, MPL, fine-tuning
        assert [r["train/h"] == 0 for r in rows if "train/h" in r] == [True, False]  # the student waits, then learns
        assert 0 <= summary["mpl/teacher_test_acc"] <= 1
        assert any("train/h" in r for r in rows)
        assert "_extra_state" in torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["method"]
    elif method == "pseudo_label":  # Lee's: no teacher; alpha(t) logged as it ramps over the epoch
        alphas = [r["train/alpha"] for r in rows if "train/alpha" in r]
        assert alphas == sorted(alphas) and alphas[0] < alphas[-1] <= 3.0 and summary["teacher"] is None
    else:
        assert any("pseudo/acc" in r for r in rows) and summary["teacher/test_acc"] is not None
        teacher = torch.load(Path(cfg.paths.cache_dir) / "teachers" / cache_key(cfg) / "teacher.pt", weights_only=True)
        assert teacher["summary"]["steps"] == 2 * (50 // 16)  # trained on the 50 labeled images alone
