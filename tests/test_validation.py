"""Validation images held out of the training set: drawn per class and recorded, never trained on (a teacher
included), reported beside the test set, and the only thing that chooses (best.pt, `--protocol best`, Optuna)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import kdrun, make_cfg
from kdrun import data as kdata
from kdrun.errors import KdrunError
from kdrun.run import run
from kdrun.teacher import cache_key

FAST = ["dataset=digits", "method=supervised", "student=mlp", "schedule.batch_size=64", "schedule.epochs=3"]


def test_validation_images_are_held_out_per_class_with_the_split_seed():
    whole = kdata.build(make_cfg("dataset=digits", "dataset.val_size=null").dataset)
    data = kdata.build(make_cfg("dataset=digits", "dataset.val_size=0.2").dataset)
    labels = whole.splits.train.labels
    assert len(data.val) + len(data.splits.train) == len(labels) and abs(len(data.val) - 0.2 * len(labels)) < 10
    assert torch.equal(data.val.labels, labels[data.val_index])
    per_class = torch.bincount(data.val.labels) / torch.bincount(labels)
    assert ((per_class - 0.2).abs() < 0.02).all()  # stratified
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[data.val_index] = False
    assert torch.equal(data.splits.train.images, whole.splits.train.images[kept])  # the rest, in order
    again = kdata.build(make_cfg("dataset=digits", "dataset.val_size=0.2").dataset)
    other = kdata.build(make_cfg("dataset=digits", "dataset.val_size=0.2", "dataset.split_seed=1").dataset)
    assert torch.equal(again.val_index, data.val_index) and not torch.equal(other.val_index, data.val_index)
    counted = kdata.build(make_cfg("dataset=digits", "dataset.val_size=300").dataset)
    assert abs(len(counted.val) - 300) < 10


@pytest.mark.parametrize("size", [0, 1.5, 1437, -3, "abc", True])
def test_a_bad_validation_size_is_one_sentence_naming_the_field(size):
    with pytest.raises(KdrunError, match=r"dataset.val_size=.*; give a number of images \(1 to 1436\) or a fraction"):
        kdata.build(make_cfg("dataset=digits", f"dataset.val_size={size}").dataset)


def test_validation_chooses_the_best_checkpoint_and_the_test_set_only_reports(tmp_path):
    summary = run(make_cfg(*FAST), tmp_path)  # the default holds a tenth out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "test/acc" in r]
    assert len(evals) == 3 and all({"val/acc", "val/loss"} <= set(r) for r in evals)
    best = max(evals, key=lambda r: r["val/acc"])  # the first of equals, as the engine keeps it
    assert summary["val/acc_best"] == best["val/acc"] and summary["val/best_epoch"] == best["epoch"]
    assert summary["test/acc_at_best_val"] == best["test/acc"] and summary["val/acc"] == evals[-1]["val/acc"]
    ckpt = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"] and ckpt["val_acc"] == best["val/acc"]
    split = json.loads((tmp_path / "split.json").read_text())
    held_out = kdata.build(make_cfg(*FAST, "dataset.val_size=0.1").dataset).val_index.tolist()
    assert split["num_val"] == len(held_out) and split["val_index"] == held_out


def test_a_teacher_trained_without_the_validation_images_has_its_own_cache_key():
    whole = ("dataset=digits", "dataset.val_size=null")
    assert cache_key(make_cfg("dataset=digits")) == cache_key(make_cfg("dataset=digits", "dataset.val_size=0.1"))
    assert cache_key(make_cfg("dataset=digits", "dataset.val_size=0.1")) != cache_key(make_cfg(*whole))
    assert cache_key(make_cfg("dataset=digits", "dataset.val_size=0.1")) != cache_key(
        make_cfg("dataset=digits", "dataset.val_size=0.2"))
    assert cache_key(make_cfg("dataset=digits", "dataset.val_size=0.1")) != cache_key(
        make_cfg("dataset=digits", "dataset.val_size=0.1", "dataset.split_seed=1"))
    assert cache_key(make_cfg(*whole, "dataset.split_seed=1")) == cache_key(make_cfg(*whole))


def test_make_table_best_protocol_needs_validation(tmp_path):
    kdrun(*FAST, "dataset.val_size=null", "hydra.run.dir=run", cwd=tmp_path)
    script = Path(__file__).parent.parent / "scripts" / "make_table.py"
    proc = subprocess.run([sys.executable, script, tmp_path, "--protocol", "best"], capture_output=True, text=True)
    assert proc.returncode != 0 and "dataset.val_size" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, script, tmp_path, "--protocol", "best-test"], capture_output=True, text=True)
    assert proc.returncode == 0 and "best epoch by test accuracy" in proc.stdout


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_better_validation_accuracy(tmp_path):
    frozen = ["schedule.optimizer.lr=0", "trainer.early_stopping_patience=2", "schedule.epochs=20"]
    summary = run(make_cfg(*FAST, "dataset.val_size=0.2", *frozen), tmp_path)  # nothing learns: epoch 1 stays best
    assert summary["stopped_early"] == 3 and summary["epochs"] == 3 and summary["val/best_epoch"] == 1
    with pytest.raises(KdrunError, match="early_stopping_patience=2 .*dataset.val_size"):
        run(make_cfg(*FAST, "dataset.val_size=null", *frozen), tmp_path / "no_val")
    assert cache_key(make_cfg("dataset=digits", "trainer.early_stopping_patience=2")) != cache_key(
        make_cfg("dataset=digits"))
