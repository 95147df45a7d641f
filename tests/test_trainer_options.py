"""Trainer options on the CPU (AMP, channels_last, torch.compile) and finding a run to resume."""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg
from kdrun.errors import KdrunError
from kdrun.run import run

DIGITS = ["dataset=digits", "method=supervised", "student=cnn_small", "schedule.epochs=1", "schedule.batch_size=64"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_fp16_with_grad_scaling_trains_on_the_cpu(tmp_path):
    summary = run(make_cfg(*DIGITS, "trainer.precision=16-mixed"), tmp_path)
    assert math.isfinite(summary["test/acc"]) and summary["test/acc"] > 0.3
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] > 0


def test_channels_last_trains_on_the_cpu(tmp_path):
    a = run(make_cfg(*DIGITS), tmp_path / "a")
    b = run(make_cfg(*DIGITS, "trainer.channels_last=true"), tmp_path / "b")
    assert b["test/acc"] == pytest.approx(a["test/acc"], abs=0.02)  # the same maths in another memory layout


@pytest.mark.slow
def test_compile_trains_on_the_cpu(tmp_path):
    start = time.perf_counter()
    summary = run(make_cfg(*DIGITS, "trainer.compile=true"), tmp_path)
    assert summary["test/acc"] > 0.3, time.perf_counter() - start


def test_resume_true_finds_the_newest_unfinished_run_of_the_same_command(tmp_path):
    from kdrun.cli import _unfinished_run

    def run_dir(name, overrides, finished=False, checkpoint=True):
        d = tmp_path / "runs" / name
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
        if checkpoint:
            (d / "checkpoints").mkdir()
            (d / "checkpoints" / "last.pt").write_bytes(b"")
        if finished:
            (d / "summary.json").write_text("{}")
        return d

    run_dir("1", ["seed=1"])
    wanted = run_dir("2", ["seed=1", "resume=false"])
    run_dir("3", ["seed=1"], finished=True)
    run_dir("4", ["seed=2"])
    run_dir("5", ["seed=1"], checkpoint=False)  # e.g. the run dir Hydra just made for `resume=true`
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    hc = SimpleNamespace(overrides=SimpleNamespace(task=["resume=true", "seed=1"]))
    assert _unfinished_run(cfg, hc) == wanted
    hc.overrides.task = ["resume=true", "seed=3"]
    with pytest.raises(KdrunError, match="no unfinished run of this command"):
        _unfinished_run(cfg, hc)
