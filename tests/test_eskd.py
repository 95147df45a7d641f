"""ESKD (Cho & Hariharan 2019): the KD -> CE stage switch, and early-stopped teachers (teacher snapshots)."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg
from kdrun import checkpoint, data as kdata
from kdrun.errors import KdrunError
from kdrun.methods.eskd import ESKD
from kdrun.run import run
from kdrun.teacher import get_teacher, snapshot

DIGITS = ["dataset=digits", "teacher=mlp", "teacher.epochs=4", "student=mlp", "+student.kwargs.hidden=[32]",
          "schedule.batch_size=64", "schedule.epochs=1", "dataset.val_size=null"]  # all 1437 training images


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_stages_switch_kd_off_without_restarting_the_schedule():
    def plan(epochs, **kw):
        stages = ESKD(_net(), _net(), **kw).stages(epochs)
        return [(s.name, s.epochs, s.fresh_optimizer, s.info["distil"]) for s in stages]

    assert plan(10, stop_epoch=3) == [("kd", 3, True, True), ("ce", 7, False, False)]
    assert plan(10, stop_fraction=0.25) == [("kd", 2, True, True), ("ce", 8, False, False)]
    assert plan(4, stop_epoch=4) == [("kd", 4, True, True)]
    assert plan(4, stop_epoch=0) == [("ce", 4, False, False)]
    with pytest.raises(KdrunError, match="outside the schedule's 4 epochs"):
        plan(4, stop_epoch=5)


def test_after_the_switch_the_loss_is_plain_cross_entropy_and_the_teacher_does_not_run():
    teacher_calls = []
    teacher = _net()
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    method = ESKD(_net(), teacher, alpha=0.9, stop_epoch=1)
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.arange(8), "index": torch.arange(8)}
    kd_stage, ce_stage = method.stages(2)
    method.on_stage_start(kd_stage, None)
    losses, metrics = method.training_step(batch)
    assert set(losses) == {"ce", "kd"} and metrics["kd_weight"] == pytest.approx(0.9) and len(teacher_calls) == 1
    method.on_stage_start(ce_stage, None)
    losses, metrics = method.training_step(batch)
    assert set(losses) == {"ce"} and metrics["kd_weight"] == 0 and len(teacher_calls) == 1
    assert torch.allclose(losses["ce"], F.cross_entropy(method.student(batch["image"]), batch["label"]))


def test_eskd_runs_end_to_end_and_logs_the_switch(tmp_path):
    summary = run(make_cfg(*DIGITS, "method=eskd", "schedule.epochs=3", "method.stop_epoch=2"), tmp_path, "eskd")
    assert summary["steps"] == 3 * (1437 // 64) and summary["test/acc"] > 0.3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/kd_weight" in r]
    ends = {round(r["epoch"]): r for r in train}  # the last train row of each epoch
    assert [ends[e]["train/kd_weight"] for e in (1, 2, 3)] == pytest.approx([0.9, 0.9, 0.0])
    assert "train/kd" in ends[2] and "train/kd" not in ends[3]
    lrs = [r["train/lr"] for r in train]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * lrs[0]  # one cosine across both stages


def test_teacher_snapshots_are_kept_replayed_and_named_by_epoch(tmp_path):
    cfg = make_cfg("dataset=digits", "teacher=mlp", "schedule.batch_size=64", "teacher.epochs=2", "teacher.seed=3",
                   "teacher.snapshot_epochs=[1]", f"paths.cache_dir={tmp_path}")
    data = kdata.build(cfg.dataset)
    full, full_acc = get_teacher(cfg, data, "cpu")
    kept = snapshot(cfg, data, "cpu", 1)  # kept while the full teacher trained
    early = checkpoint.load(kept)
    assert kept.name == "epoch_1.pt" and 0 < early["test_acc"] and early["epoch"] == 1
    kept.unlink()  # as if the teacher had been trained without teacher.snapshot_epochs: replayed
    replayed = checkpoint.load(snapshot(cfg, data, "cpu", 1))
    assert all(torch.equal(replayed["model"][k], v) for k, v in early["model"].items())
    assert replayed["test_acc"] == early["test_acc"]
    assert not list(kept.parent.parent.glob(".replay-*"))
    cfg.teacher.checkpoint = "epoch_1"
    teacher, acc = get_teacher(cfg, data, "cpu")
    assert acc == early["test_acc"] != full_acc
    assert all(torch.equal(v, early["model"][k]) for k, v in teacher.state_dict().items())
    cfg.teacher.checkpoint = "epoch_3"
    with pytest.raises(KdrunError, match=r"name an epoch in 1..2"):
        get_teacher(cfg, data, "cpu")


def test_the_paper_presets_compose_into_the_four_arms():
    arms = {"scratch": ("Supervised", False), "kd": ("KD", False), "kd_early_teacher": ("KD", True),
            "eskd": ("ESKD", False)}
    for setting in ("fashion_mnist", "cifar10", "imagenet"):
        for arm, (method, early_teacher) in arms.items():
            cfg = make_cfg(f"experiment=eskd/{setting}_{arm}", "dataset.root=/data")
            OmegaConf.to_container(cfg, resolve=True)
            assert cfg.method._target_.endswith(method) and cfg.dataset.name == setting
            if early_teacher:  # the early-stopped teacher is a snapshot the teacher's run keeps
                assert cfg.teacher.checkpoint == f"epoch_{cfg.teacher.snapshot_epochs[0]}"
            else:
                assert cfg.teacher.checkpoint is None
            if arm == "eskd":
                assert 0 < cfg.method.stop_epoch < cfg.schedule.epochs
