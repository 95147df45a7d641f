"""The trainer's extras: an EMA of the student's weights, gradient accumulation, the TensorBoard logger."""

import json
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg
from kdrun import data as kdata
from kdrun.data.sources import digits
from kdrun.engine import Engine, Interrupted
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate
from kdrun.loggers import RunLogger
from kdrun.methods.supervised import Supervised


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loaders(batch):
    return kdata.Loaders(kdata.Data("digits", digits(), [0.3], [0.4], {}), kdata.BatchSpec(), batch, 512, "cpu", seed=0)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _engine(method, run_dir=None, batch=64, epochs=1, lr_schedule="cosine", **trainer):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": epochs, "optimizer": {"lr": 0.1}, "lr_schedule": lr_schedule})
    return Engine(method, _loaders(batch), schedule, OmegaConf.merge(cfg.trainer, trainer), run_dir=run_dir)


class Recorded(Supervised):
    """Supervised training that keeps the student's weights after every step; it can SIGTERM itself at a step."""

    def __init__(self, student, stop_at=None):
        super().__init__(student)
        self.weights, self.stop_at = [], stop_at

    def step(self, batch, loop):
        out = super().step(batch, loop)
        self.weights.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})
        if len(self.weights) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def test_ema_is_evaluated_and_checkpointed_and_equals_a_hand_computed_ema(tmp_path):
    decay = 0.8
    method = Recorded(_net())
    summary = _engine(method, tmp_path, max_steps=6, ema_decay=decay).fit()
    ema = dict(method.weights[0])  # the first update copies the weights
    for w in method.weights[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert set(saved) == set(ema)
    for k in ema:
        torch.testing.assert_close(saved[k], ema[k])
    assert not torch.allclose(saved["3.weight"], method.weights[-1]["3.weight"])  # not the raw student
    net = _net()
    net.load_state_dict(saved)
    assert summary["test/acc"] == evaluate(net, _loaders(64).evaluation())["acc"]


def test_a_stopped_run_with_ema_and_accumulation_resumes_exactly(tmp_path):
    options = {"ema_decay": 0.9, "accumulate_grad_batches": 3, "checkpoint_every_steps": 5}
    whole = Recorded(_net())
    _engine(whole, tmp_path / "whole", epochs=2, **options).fit()
    with pytest.raises(Interrupted):  # at step 32: epoch 2's 10th batch of 22, the first of its window of 3
        _engine(Recorded(_net(), stop_at=32), tmp_path / "stopped", epochs=2, **options).fit()
    last = tmp_path / "stopped" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["grads"] is not None  # the window's gradients so far
    resumed = Recorded(_net())
    _engine(resumed, tmp_path / "stopped", epochs=2, **options).fit(resume=last)
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True)["model"] for d in (tmp_path / "whole",
                                                                                          tmp_path / "stopped"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(whole.weights[-1].values(), resumed.weights[-1].values()))


def test_accumulating_n_batches_of_b_is_one_step_on_a_batch_of_n_times_b():
    big, small = Recorded(_net()), Recorded(_net())
    _engine(big, batch=64, max_steps=2, lr_schedule="constant").fit()  # (a cosine's length differs: 22 or 23 steps)
    _engine(small, batch=16, max_steps=8, accumulate_grad_batches=4, lr_schedule="constant").fit()
    for k in big.weights[-1]:
        torch.testing.assert_close(small.weights[3][k], big.weights[0][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(small.weights[7][k], big.weights[1][k], rtol=1e-5, atol=1e-6)
    start = _net().state_dict()
    assert all(torch.equal(small.weights[i][k], start[k]) for i in (0, 1, 2) for k in start)  # no step in between


def test_accumulation_is_refused_for_a_method_with_an_optimizer_of_its_own():
    class OwnOptimizer(Supervised):
        def step(self, batch, loop):
            with loop.autocast():
                losses, metrics = self.training_step(batch)
            loop.optimize(sum(losses.values()), optimizer=self.optimizer)
            return losses, metrics

    method = OwnOptimizer(_net())
    method.optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    with pytest.raises(KdrunError, match="accumulate_grad_batches=2, but OwnOptimizer steps an optimizer of its own"):
        _engine(method, accumulate_grad_batches=2, max_steps=2).fit()


@pytest.mark.parametrize("option", ["accumulate_grad_batches=0", "ema_decay=1.5"])
def test_bad_extras_are_refused(option):
    key, value = option.split("=")
    with pytest.raises(KdrunError, match=option):
        _engine(Supervised(_net()), **{key: float(value) if "." in value else int(value)})


def test_a_run_with_ema_and_accumulation_through_the_config(tmp_path):
    from kdrun.run import run

    base = ["dataset=digits", "teacher=mlp", "student=mlp", "method=kd", "schedule.epochs=2", "schedule.batch_size=32",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    summary = run(make_cfg(*base, "trainer.ema_decay=0.9", "trainer.accumulate_grad_batches=2"), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    batches = (1437 - 142) // 32  # per epoch: digits less the tenth held out for validation (the default val_size)
    assert ckpt["ema"]["n_averaged"] == 2 * -(-batches // 2)  # one update per optimizer step
    assert summary["steps"] == 2 * batches and "val/acc" in summary  # steps count batches
    raw = {k[len("student."):]: v for k, v in ckpt["method"].items() if k.startswith("student.")}
    assert set(raw) == set(ckpt["model"]) and not all(torch.equal(raw[k], ckpt["model"][k]) for k in raw)  # the EMA


def test_tensorboard_logger_writes_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, OmegaConf.create({"backend": "tensorboard"}))
    for step in (10, 20, 30):
        logger.log({"epoch": step / 10, "train/loss": 1 / step, "test/acc": step / 100}, step)
    logger.rewind(20)  # a resumed run trains step 30 again
    logger.log({"train/loss": 0.5}, 30)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(10, 0.1), (20, 0.05), (30, 0.5)]
    assert [e.step for e in events.Scalars("test/acc")] == [10, 20]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
