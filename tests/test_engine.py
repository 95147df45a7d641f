import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import kdrun
from conftest import make_cfg
from kdrun import data as kdata
from kdrun.data.sources import digits
from kdrun.engine import Engine, Interrupted, lr_factor
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate
from kdrun.loggers import RunLogger
from kdrun.methods.base import Method, Stage
from kdrun.methods.supervised import Supervised


def test_lr_schedules():
    cos = OmegaConf.create({"lr_schedule": "cosine", "warmup_epochs": 1})
    assert lr_factor(cos, 0, 100, 10) == pytest.approx(0.1)  # warm-up: (step + 1) / 10
    assert lr_factor(cos, 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = OmegaConf.create({"lr_schedule": "step", "milestones": [150, 180, 210], "gamma": 0.1})
    assert [lr_factor(step, e * 10, 2400, 10) for e in (149, 150, 180, 239)] == pytest.approx([1, 0.1, 0.01, 0.001])
    with pytest.raises(KdrunError, match="use cosine, step or constant"):
        lr_factor(OmegaConf.create({"lr_schedule": "linear"}), 0, 10, 1)


def _loaders(batch=64):
    """Digits, un-augmented, in batches of `batch` (512 for evaluation)."""
    return kdata.Loaders(kdata.Data("digits", digits(), [0.3], [0.4], {}), kdata.BatchSpec(), batch, 512, "cpu", seed=0)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _engine(method, tmp_path, **schedule):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    sched = OmegaConf.merge(cfg.schedule, {"epochs": 3, "optimizer": {"lr": 0.1}}, schedule)
    return Engine(method, _loaders(), sched, cfg.trainer, run_dir=tmp_path, device="cpu")


def test_supervised_engine_learns_and_writes_loadable_checkpoints(tmp_path):
    summary = _engine(Supervised(_net()), tmp_path).fit()
    assert summary["test/acc"] > 0.85 and summary["steps"] == 3 * (1437 // 64)
    assert summary["test/acc_best"] >= summary["test/acc"]
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert set(ckpt["model"]) == set(_net().state_dict())
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary file left behind


class TwoStages(Method):
    """Stage 1 trains only the first layer on a loss of its output; stage 2 trains everything."""

    def __init__(self, student):
        super().__init__(student)
        self.seen = []

    def stages(self, epochs):
        return [Stage("first", 1, params=list(self.student[1].parameters())), Stage("all", epochs - 1)]

    def on_stage_start(self, stage, loop):
        self.seen.append(stage.name)
        self.stage = stage.name

    def training_step(self, batch):
        if self.stage == "first":
            return {"l2": self.student[1](batch["image"].flatten(1)).pow(2).mean()}, {}
        return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}, {}


def test_stages_run_in_order_and_train_only_their_parameters(tmp_path):
    method = TwoStages(_net())
    engine = _engine(method, tmp_path)
    head = method.student[3].weight.detach().clone()
    first = method.student[1].weight.detach().clone()
    engine.max_steps = len(engine.loaders.train())  # stop after stage 1
    engine.fit()
    assert method.seen == ["first"]
    assert torch.equal(method.student[3].weight, head)
    assert not torch.equal(method.student[1].weight, first)
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == {id(p) for p in method.student[1].parameters()}


def test_stage_without_fresh_optimizer_continues_the_schedule():
    class Continue(Method):
        def stages(self, epochs):
            return [Stage("a", 1), Stage("b", 2, fresh_optimizer=False)]

        def training_step(self, batch):
            return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}, {}

    method = Continue(_net())
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    engine = Engine(method, _loaders(), OmegaConf.merge(cfg.schedule, {"epochs": 3}), cfg.trainer)
    engine.fit()
    # one cosine over all 3 epochs: the final learning rate is ~0, not the restart value
    assert engine.optimizer.param_groups[0]["lr"] < 1e-3 * cfg.schedule.optimizer.lr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class Explodes(Supervised):
        def training_step(self, batch):
            losses, metrics = super().training_step(batch)
            if self.calls == 30:
                losses["ce"] = losses["ce"] * float("nan")
            self.calls += 1
            return losses, metrics

    method = Explodes(_net())
    method.calls = 0
    with pytest.raises(KdrunError, match=r"became nan by step \d+ \(train/ce\); .*last good checkpoint .*last.pt; "
                                         "lower the learning rate"):
        _engine(method, tmp_path).fit()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_the_cpu(tmp_path):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine", "trainer.precision=bf16")
    engine = Engine(Supervised(_net()), _loaders(), OmegaConf.merge(cfg.schedule, {"epochs": 1}), cfg.trainer)
    summary = engine.fit()
    assert math.isfinite(summary["test/acc"]) and summary["test/acc"] > 0.5


# ---- stages that own their data and their evaluation ---------------------------------------------------------
OLD, NEW = tuple(range(5)), tuple(range(5, 10))
SETS = (kdata.TEST, kdata.EvalSet("old", classes=OLD), kdata.EvalSet("old_task", classes=OLD, mask=OLD))


class TwoExperiences(Supervised):
    """Classes 0-4 for one epoch, then 5-9 for two, each stage reporting the test set whole and the old classes
    (with and without the task-incremental mask); it can send itself SIGTERM at a given step, as a preemption."""

    def __init__(self, student, stop_at: int | None = None):
        super().__init__(student)
        self.stop_at, self.seen = stop_at, []

    def stages(self, epochs):
        return [Stage("old", 1, data=kdata.Selection(classes=OLD), evaluate=SETS),
                Stage("new", epochs - 1, data=kdata.Selection(classes=NEW), evaluate=SETS)]

    def on_stage_start(self, stage, loop):
        self.stage = stage.name

    def training_step(self, batch):
        self.seen.append((self.stage, batch["label"], batch["index"]))
        if len(self.seen) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch)


def _augmented_loaders():
    data = kdata.Data("digits", digits(), [0.3], [0.4], {"crop_padding": 1})
    return kdata.Loaders(data, kdata.BatchSpec(), 64, 512, "cpu", seed=0), data


def test_each_stage_trains_on_its_selection_and_reports_its_named_sets(tmp_path):
    loaders, data = _augmented_loaders()
    method = TwoExperiences(_net())
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    logger = RunLogger(tmp_path)
    summary = Engine(method, loaders, OmegaConf.merge(cfg.schedule, {"epochs": 3}), cfg.trainer, tmp_path, logger).fit()
    logger.close()
    labels = data.splits.train.labels
    for stage, classes in (("old", OLD), ("new", NEW)):
        seen = [(y, i) for s, y, i in method.seen if s == stage]
        assert seen and all(set(y.tolist()) <= set(classes) and torch.equal(labels[i], y) for y, i in seen)
    n_old, n_new = (int(torch.isin(labels, torch.tensor(c)).sum()) // 64 for c in (OLD, NEW))
    assert summary["steps"] == n_old + 2 * n_new
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "test/acc" in r]
    assert len(evals) == 3 and all({"old/acc", "old/loss", "old_task/acc", "old_task/loss"} <= set(r) for r in evals)
    assert evals[0]["old/acc"] > evals[0]["test/acc"]  # trained on the old classes alone so far
    assert all(r["old_task/acc"] >= r["old/acc"] for r in evals)  # a mask can only help
    assert summary["test/acc"] == evals[-1]["test/acc"]


def test_a_run_stopped_in_its_second_stage_resumes_exactly(tmp_path):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine", "trainer.checkpoint_every_steps=4")
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": 3})
    whole = TwoExperiences(_net())
    Engine(whole, _augmented_loaders()[0], schedule, cfg.trainer, tmp_path / "whole").fit()
    stop_at = len([s for s, _, _ in whole.seen if s == "old"]) + 13  # mid-epoch in the second stage
    stopped = TwoExperiences(_net(), stop_at=stop_at)
    with pytest.raises(Interrupted):
        Engine(stopped, _augmented_loaders()[0], schedule, cfg.trainer, tmp_path / "stopped").fit()
    resumed = TwoExperiences(_net())
    Engine(resumed, _augmented_loaders()[0], schedule, cfg.trainer, tmp_path / "stopped").fit(
        resume=tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert torch.equal(resumed.seen[-1][2], whole.seen[-1][2])  # the same last batch


def test_selections_keep_positions_in_the_whole_set_and_refuse_an_empty_one():
    loaders, data = _augmented_loaders()
    every_third = tuple(range(0, len(data.splits.train), 3))
    index = torch.cat([b["index"] for b in loaders.train(kdata.Selection(indices=every_third))])
    assert set(index.tolist()) <= set(every_third) and len(index) == len(every_third) // 64 * 64
    both = kdata.Selection(classes=(3,), indices=every_third)
    assert all((data.splits.train.labels[b["index"]] == 3).all() for b in loaders.train(both))
    with pytest.raises(KdrunError, match="holds no image"):
        loaders.train(kdata.Selection(classes=(11,)))


def test_masked_evaluation_restricts_the_logits_to_the_sets_classes():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([[2.0, 1.0, 3.0], [0.0, 4.0, 1.0]]) + self.w

    batch = {"image": torch.zeros(2, 1), "label": torch.tensor([0, 1])}
    whole = evaluate(Fixed(), [batch])
    masked = evaluate(Fixed(), [batch], classes=(0, 1))
    assert whole["acc"] == 0.5 and masked["acc"] == 1.0  # class 2 wins the first image unless masked
    by_hand = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1))) - math.log(math.exp(4) / (1 + math.exp(4)))) / 2
    assert masked["loss"] == pytest.approx(by_hand)
    hidden = evaluate(Fixed(), [{"image": torch.zeros(2, 1), "label": torch.tensor([2, 1])}], classes=(0, 1))
    assert hidden == {"acc": 0.5, "loss": None}  # an image of a masked-out class: its cross-entropy is infinite


def test_methods_see_the_loop_only_through_its_context():
    """No method imports the engine or reads its attributes; no engine, run, data or cache code imports a method
    (but the base; a teacher kdrun trains is trained by `supervised`, in kdrun/teacher.py)."""
    root = Path(kdrun.__file__).parent
    for f in (root / "methods").glob("*.py"):
        text = f.read_text()
        assert not re.search(r"^(from kdrun\.engine|import kdrun\.engine|from kdrun import .*\bengine\b)", text, re.M), f
        assert not re.search(r"(?<![.\w])engine\.\w", text), f  # an engine's attribute (kdrun.engine.X may be named)
    for f in [root / "engine.py", root / "run.py", root / "cache.py", *(root / "data").glob("*.py")]:
        assert set(re.findall(r"^from kdrun\.methods\.(\w+)", f.read_text(), re.M)) <= {"base"}, f


@pytest.mark.parametrize("override, message", [
    (("schedule.epochs=-1",), "schedule.epochs=-1 is not allowed; schedule.epochs takes an integer >= 1"),  # validate
    (("schedule.epochs=0",), "schedule.epochs=0 is not allowed"),
    (("trainer.max_steps=-5",), "trainer.max_steps=-5 is not allowed; trainer.max_steps takes an integer >= 1"),
    (("dataset=image_folder", "schedule.batch_size=64"), "fewer training images than one batch \\(schedule.batch_size=64\\)"),
])
def test_a_run_with_nothing_to_train_is_refused_before_it_starts(tmp_path, override, message):
    from PIL import Image

    from kdrun.run import run

    for split, c, i in [(split, c, i) for split in ("train", "val") for c in range(2) for i in range(3)]:
        (tmp_path / "data" / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    folder = (f"dataset.root={tmp_path / 'data'}",) if "dataset=image_folder" in override else ()
    cfg = make_cfg("dataset=digits", "method=supervised", *override, *folder)
    with pytest.raises(KdrunError, match=message):
        run(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


def test_a_teacher_that_would_not_train_is_never_used_or_cached(tmp_path):
    from kdrun import teacher

    data = kdata.build(make_cfg("dataset=digits").dataset)
    for epochs, message in ((0, "teacher.epochs=0 uses the teacher as it is, but cnn is neither pretrained"),
                            (-3, "has -3 epochs to train")):
        cfg = make_cfg("dataset=digits", f"teacher.epochs={epochs}", f"paths.cache_dir={tmp_path}")
        with pytest.raises(KdrunError, match=message):
            teacher.get_teacher(cfg, data, "cpu")
    assert not list(tmp_path.glob("teachers/*/teacher.pt"))
