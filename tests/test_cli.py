"""The `kdrun` command line end to end, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import kdrun, make_cfg, needs_fashion_mnist
from kdrun import data as kdata, models
from kdrun.teacher import cache_key

SUMMARY_KEYS = {"test/acc", "test/acc_best", "teacher/test_acc", "method", "seed", "steps", "wall_s",
                "train/samples_per_s"}
DIGITS = ["dataset=digits", "logger=none", "schedule=sgd_cosine", "schedule.epochs=3", "schedule.batch_size=64"]


def _runs(root):
    return sorted(p.parent for p in root.glob("outputs/**/summary.json"))


def test_help_lists_the_groups_and_cfg_prints_the_config(tmp_path):
    out = kdrun("--help", cwd=tmp_path).stdout
    assert "kdrun: knowledge distillation" in out
    for group in ("dataset:", "teacher:", "student:", "method:", "schedule:", "logger:", "trainer:"):
        assert group in out
    assert "fashion_mnist" in out and "sgd_step" in out
    cfg = kdrun("--cfg", "job", "method=supervised", "schedule=sgd_step", cwd=tmp_path).stdout
    assert "_target_: kdrun.methods.supervised.Supervised" in cfg and "milestones:" in cfg


def _options(group):
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("kdrun.conf").joinpath(group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group", ["dataset", "teacher", "student", "method", "schedule", "logger", "trainer"])
def test_every_config_option_composes(group):
    for option in _options(group):
        cfg = make_cfg(f"{group}={option}", "dataset.root=/data" if option in ("image_folder", "imagenet") else "seed=0")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


@pytest.mark.parametrize("group", ["teacher", "student"])
def test_every_model_preset_runs_at_its_dataset_shape(group):
    cfg = make_cfg()
    data = kdata.Data("fashion_mnist", kdata.Splits(None, None, 10, 1, 28), [0.3], [0.3], {})
    for option in _options(group):
        model = models.build(make_cfg(f"{group}={option}")[group], data).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10), option
    assert cfg.teacher.name == "cnn"


def test_supervised_run_writes_the_run_dir_contract(tmp_path):
    proc = kdrun(*DIGITS, "method=supervised", cwd=tmp_path)
    (run,) = _runs(tmp_path)
    lines = [line for line in proc.stdout.splitlines() if " train epoch " in line]  # no terminal: no progress bars
    assert [line.split(" train epoch ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " test/acc " in line and " samples/s " in line for line in lines)
    assert (run / "kdrun.log").read_text().count(" train epoch ") == 3  # Hydra's job log has them too
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "supervised" and summary["teacher/test_acc"] is None
    assert 0.8 < summary["test/acc"] <= summary["test/acc_best"] <= 1
    assert (run / ".hydra" / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "train/loss", "train/lr"} <= set(rows[0])
    assert sum("test/acc" in r for r in rows) == 3
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["arch"]["num_classes"] == 10


def test_an_image_folder_keys_its_teacher_by_what_it_holds_not_where(tmp_path):
    from PIL import Image

    def folder(name, shade):
        for split, c, i in [(split, c, i) for split in ("train", "val") for c in range(2) for i in range(3)]:
            (tmp_path / name / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), shade * (i + 1)).save(tmp_path / name / split / f"c{c}" / f"{i}.png")

    def key(name):
        cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path / name}")
        return cache_key(cfg, kdata.build(cfg.dataset))

    folder("a", 10)
    folder("b", 10)  # the same images elsewhere
    (tmp_path / "c").mkdir()
    folder("c", 10)
    Image.new("L", (8, 8), 0).save(tmp_path / "c" / "train" / "c1" / "3.png")  # one image more
    assert key("a") == key("b") != key("c")


def test_the_teacher_cache_key_ignores_where_the_data_lives():
    here = cache_key(make_cfg("paths.data_dir=/a"))
    assert cache_key(make_cfg("paths.data_dir=/b", "dataset.download=false")) == here
    assert cache_key(make_cfg("paths.data_dir=/a", "teacher.epochs=3")) != here


def test_kd_trains_caches_and_reuses_its_teacher_reproducibly(tmp_path):
    first = kdrun(*DIGITS, "method=kd", "teacher=resnet8", "student=cnn_small", cwd=tmp_path)
    assert "training resnet8 on digits" in first.stderr + first.stdout
    second = kdrun(*DIGITS, "method=kd", "teacher=resnet8", "student=cnn_small", cwd=tmp_path)
    assert "reusing resnet8" in second.stderr + second.stdout
    a, b = (json.loads((r / "summary.json").read_text()) for r in _runs(tmp_path))
    assert a["teacher/test_acc"] == b["teacher/test_acc"] > 0.8
    assert a["test/acc"] == b["test/acc"] and a["test/acc_best"] == b["test/acc_best"]
    assert a["method"] == "kd" and a["student/params"] < a["teacher/params"]
    assert "teacher  resnet8" in first.stdout and "student  cnn" in first.stdout


def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    kdrun("-m", *DIGITS, "method=supervised", "schedule.epochs=1", "seed=0,1", cwd=tmp_path)
    runs = _runs(tmp_path)
    assert len(runs) == 2
    assert {json.loads((r / "summary.json").read_text())["seed"] for r in runs} == {0, 1}


@needs_fashion_mnist
def test_kd_on_a_fashion_mnist_slice(tmp_path):
    out = kdrun("trainer.max_steps=5", "logger=none", cwd=tmp_path).stdout
    (run,) = _runs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["dataset"] == "fashion_mnist" and summary["method"] == "kd"
    assert "kdrun kd on fashion_mnist" in out


@pytest.mark.parametrize("args, message", [
    (["student.name=resnt18"], "unknown model 'resnt18'"),
    (["teacher.checkpoint=/nonexistent/teacher.pt"], "checkpoint /nonexistent/teacher.pt does not exist"),
    (["dataset=mnist", "dataset.download=false"], "MNIST is not in"),
    (["method=nonexistent"], "Could not find 'method/nonexistent'"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    proc = kdrun(*DIGITS, *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_for_other_classes_is_refused(tmp_path):
    kdrun(*DIGITS, "method=supervised", "student=cnn_small", "schedule.epochs=1", cwd=tmp_path)
    (run,) = _runs(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["arch"]["num_classes"] = 3  # as if trained on a 3-class dataset
    torch.save(ckpt, tmp_path / "three.pt")
    proc = kdrun(*DIGITS, f"teacher.checkpoint={tmp_path / 'three.pt'}", "teacher=cnn_small", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "predicts 3 classes" in proc.stderr and "digits has 10" in proc.stderr


def test_wandb_without_api_key_falls_back_to_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="online", HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "kdrun", *DIGITS[:1], "logger=wandb", "method=supervised",
                           "schedule.epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "no API key" in out and "wandb sync" in out
    (run,) = _runs(tmp_path)
    assert list((run / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("override, message", [
    ("student.name=resnt18", "resnt18"),
    ("method=fitnet", "teacher has no module 'layer9'"),
])
def test_a_bad_student_method_or_layer_fails_before_the_teacher_trains(tmp_path, override, message):
    from kdrun.errors import KdrunError
    from kdrun.run import run

    extra = ["teacher.feature_layers=[layer9]"] if override == "method=fitnet" else []
    cfg = make_cfg("dataset=digits", override, *extra, f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(KdrunError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache" / "teachers").exists()
