import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg
from kdrun.data.loaders import Normalize, TensorLoader
from kdrun.data.sources import digits
from kdrun.engine import Engine, lr_factor
from kdrun.errors import KdrunError
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
    d = digits()
    norm = Normalize([0.3], [0.4], "cpu")
    return (TensorLoader(d.train, batch, norm, "cpu", shuffle=True, drop_last=True, seed=0),
            TensorLoader(d.test, 512, norm, "cpu"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _engine(method, tmp_path, **schedule):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    sched = OmegaConf.merge(cfg.schedule, {"epochs": 3, "optimizer": {"lr": 0.1}}, schedule)
    train, test = _loaders()
    return Engine(method, train, test, sched, cfg.trainer, run_dir=tmp_path, device="cpu")


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

    def on_stage_start(self, stage):
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
    engine.max_steps = len(engine.train_loader)  # stop after stage 1
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
    train, test = _loaders()
    engine = Engine(method, train, test, OmegaConf.merge(cfg.schedule, {"epochs": 3}), cfg.trainer, None)
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
    with pytest.raises(KdrunError, match=r"became nan by step \d+; .*last good checkpoint .*last.pt"):
        _engine(method, tmp_path).fit()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_the_cpu(tmp_path):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine", "trainer.precision=bf16")
    train, test = _loaders()
    engine = Engine(Supervised(_net()), train, test, OmegaConf.merge(cfg.schedule, {"epochs": 1}), cfg.trainer, None)
    summary = engine.fit()
    assert math.isfinite(summary["test/acc"]) and summary["test/acc"] > 0.5
