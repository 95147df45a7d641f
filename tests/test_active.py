"""Active learning (kdrun/active.py): the heuristics' scores against hand values, the loop's files, resuming and
the settings it refuses."""

import csv
import json
import math
import os
import shutil
import signal

import pytest
import torch
from conftest import kdrun, make_cfg

from kdrun import active
from kdrun import data as kdata
from kdrun.engine import Interrupted
from kdrun.errors import KdrunError
from kdrun.methods.supervised import Supervised
from kdrun.run import run


# ---- the scores ----------------------------------------------------------------------------------------------
def test_entropy_margin_and_least_confidence_on_hand_made_probabilities():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    h4 = -(0.4 * math.log(0.4) + 0.35 * math.log(0.35) + 0.25 * math.log(0.25))
    assert active.entropy(p).tolist() == pytest.approx([math.log(2), 0.0, h, h4], abs=1e-6)
    assert active.margin(p).tolist() == pytest.approx([0.0, -1.0, -0.3, -0.05], abs=1e-6)
    assert active.least_confidence(p).tolist() == pytest.approx([0.5, 0.0, 0.4, 0.6], abs=1e-6)
    # as the loop calls them: one pass, (1, N, C)
    assert active.SCORES["margin"](p[None]).tolist() == pytest.approx([0.0, -1.0, -0.3, -0.05], abs=1e-6)


def test_bald_is_the_mutual_information_over_the_stochastic_passes():
    # image 0: the passes disagree completely (each certain): MI = ln 2; image 1: each pass unsure in the same way:
    # MI = 0 though its entropy is ln 2; image 2: passes (0.9, 0.1) and (0.5, 0.5)
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]],
                      [[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]])
    h = lambda *q: -sum(x * math.log(x) for x in q if x)
    expected = [math.log(2), 0.0, h(0.7, 0.3) - (h(0.9, 0.1) + h(0.5, 0.5)) / 2]
    assert active.bald(p).tolist() == pytest.approx(expected, abs=1e-6)


def test_ensemble_scores_the_entropy_of_the_averaged_softmax():
    p = torch.tensor([[[0.8, 0.2], [1.0, 0.0]],
                      [[0.4, 0.6], [1.0, 0.0]]])
    assert active.ensemble(p).tolist() == pytest.approx([-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), 0.0], abs=1e-6)


def test_consistency_is_the_variance_of_the_softmax_across_augmented_copies():
    p = torch.tensor([[[1.0, 0.0], [0.7, 0.3], [0.9, 0.1]],
                      [[0.0, 1.0], [0.7, 0.3], [0.5, 0.5]],
                      [[1.0, 0.0], [0.7, 0.3], [0.7, 0.3]]])
    # per class, the population variance over the 3 copies; summed over the 2 classes (equal here)
    var = lambda *x: sum((v - sum(x) / len(x)) ** 2 for v in x) / len(x)
    expected = [2 * var(1, 0, 1), 0.0, 2 * var(0.9, 0.5, 0.7)]
    assert active.consistency(p).tolist() == pytest.approx(expected, abs=1e-6)


def test_top_k_and_the_outlier_filter():
    assert active.top_k(torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2]), 3).tolist() == [1, 3, 2]  # ties: lower first
    # confidence (top class of the mean over 2 passes): 0.9, 0.55, 0.7, 0.5 -> leaving out half drops images 1 and 3
    p = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.5, 0.5]],
                      [[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.5, 0.5]]])
    assert active.keep_confident(p, 0.5).tolist() == [0, 2]
    assert active.keep_confident(p, 0.3).tolist() == [0, 1, 2]  # int(0.3 * 4) = 1 left out


def test_round_zero_is_stratified_and_seeded():
    labels = torch.arange(10).repeat_interleave(30)
    first = active.initial(labels, 20, "stratified", seed=0)
    assert torch.bincount(labels[first], minlength=10).tolist() == [2] * 10 and len(set(first.tolist())) == 20
    assert torch.equal(first, active.initial(labels, 20, "stratified", seed=0))
    assert not torch.equal(first, active.initial(labels, 20, "stratified", seed=1))
    assert sorted(torch.bincount(labels[active.initial(labels, 13, "stratified", 0)], minlength=10).tolist()) == [1] * 7 + [2] * 3
    assert len(active.initial(labels, 20, "random", 0).unique()) == 20


# ---- the loop ------------------------------------------------------------------------------------------------
FAST = ("dataset=digits", "method=supervised", "active.steps=8", "trainer.log_every=4")


def _loop(tmp_path, *overrides, heuristic="margin", rounds=3):
    cfg = make_cfg(f"active={heuristic}", "active.initial=20", "active.query=20", f"active.rounds={rounds}", *FAST,
                   *overrides)
    return run(cfg, tmp_path)


def _labeled(run_dir, k):
    return json.loads((run_dir / "rounds" / str(k) / "labeled.json").read_text())


def test_the_must_hold_loop_writes_four_rows_and_nested_labeled_sets(tmp_path, one_thread):
    summary = _loop(tmp_path)
    with open(tmp_path / "active_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["labels"]) for r in rows] == [20, 40, 60, 80] and [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    val = set(json.loads((tmp_path / "split.json").read_text())["val_index"])
    before = set()
    for k in range(4):
        record = _labeled(tmp_path, k)
        labeled, queried = set(record["labeled"]), set(record["queried"])
        assert len(labeled) == 20 * (k + 1) == record["labels"] and len(queried) == 20
        assert before < labeled and labeled - before == queried  # nested, growing by the queried images
        assert not set(record["source_index"]) & val  # no validation image is ever labeled
        assert max(labeled) < 1437 - len(val)  # positions in the run's training set (digits less validation)
        assert (tmp_path / "rounds" / str(k) / "summary.json").is_file()
        assert (tmp_path / "rounds" / str(k) / "checkpoints" / "last.pt").is_file()
        before = labeled
    # round k trains on its labeled images: 20 * (k + 1) per epoch (batch capped at the labeled count), 8 steps
    assert [json.loads((tmp_path / "rounds" / str(k) / "summary.json").read_text())["steps"] for k in range(4)] == [8] * 4
    assert summary["active/labels"] == [20, 40, 60, 80]
    assert summary["active/test_acc"] == [pytest.approx(float(r["test_acc"])) for r in rows]
    assert summary["test/acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["active/labels"] for r in logged] == [20, 40, 60, 80]


def test_margin_queries_the_pool_images_with_the_smallest_margin(tmp_path, one_thread):
    _loop(tmp_path, rounds=1)
    cfg = make_cfg("active=margin", *FAST)
    data = kdata.build(cfg.dataset)
    net = active._trained(cfg, data, tmp_path, 0, 0, "cpu")
    labeled = torch.tensor(_labeled(tmp_path, 0)["labeled"])
    pool = torch.tensor([i for i in range(len(data.splits.train)) if i not in set(labeled.tolist())])
    x = (data.splits.train.images[pool].float() / 255 - data.mean[0]) / data.std[0]
    with torch.no_grad():
        top2 = net(x).softmax(-1).topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    expected = set(pool[gap.argsort()[:20]].tolist())
    assert set(_labeled(tmp_path, 1)["queried"]) == expected


def test_a_loop_stopped_inside_a_round_and_between_rounds_labels_the_same_images(tmp_path, one_thread, monkeypatch):
    # BALD on a random subsample of the pool: the scoring draws (subsample, dropout masks) must be the same too
    def loop(run_dir):
        return _loop(run_dir, "student.drop_rate=0.25", "active.pool_size=400", "active.mc_samples=4", heuristic="bald",
                     rounds=2)

    whole = loop(tmp_path / "whole")
    # stopped by SIGTERM in the middle of round 2 (rounds of 8 steps: step 20), then rerun
    steps = {"n": 0}
    original = Supervised.training_step

    def stopping(self, batch):
        steps["n"] += 1
        if steps["n"] == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(Supervised, "training_step", stopping)
    with pytest.raises(Interrupted):
        loop(tmp_path / "stopped")
    assert not (tmp_path / "stopped" / "rounds" / "2" / "summary.json").exists()
    assert (tmp_path / "stopped" / "rounds" / "2" / "checkpoints" / "last.pt").is_file()
    monkeypatch.setattr(Supervised, "training_step", original)
    resumed = loop(tmp_path / "stopped")
    # between rounds: round 2 gone (its labeled images to be chosen again from round 1's model)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "rounds" / "2")
    cut = loop(tmp_path / "cut")
    for k in range(3):
        assert _labeled(tmp_path / "stopped", k) == _labeled(tmp_path / "whole", k) == _labeled(tmp_path / "cut", k)
    assert resumed["active/test_acc"] == whole["active/test_acc"] == cut["active/test_acc"]


@pytest.mark.parametrize("heuristic", ["random", "entropy", "least_confidence", "bald", "ensemble", "consistency"])
def test_every_heuristic_runs_the_loop(tmp_path, one_thread, heuristic):
    cfg = make_cfg(f"active={heuristic}", "active.initial=20", "active.query=10", "active.rounds=1", *FAST,
                   "active.steps=4", "active.ensemble_size=2", "active.mc_samples=3", "active.augmentations=2",
                   "student.drop_rate=0.25", "active.drop_hardest=0.1", "active.pool_size=300")
    summary = run(cfg, tmp_path)
    assert summary["active/labels"] == [20, 30]
    assert len(set(_labeled(tmp_path, 1)["labeled"])) == 30
    assert (tmp_path / "rounds" / "0" / "members" / "1" / "summary.json").is_file() == (heuristic == "ensemble")


def test_a_kd_student_gets_a_teacher_trained_on_the_labeled_images_only(tmp_path, one_thread):
    cfg = make_cfg("active=entropy", "active.initial=20", "active.query=20", "active.rounds=1", *FAST[:1],
                   "method=kd", "active.steps=4")
    summary = run(cfg, tmp_path)
    assert summary["active/labels"] == [20, 40] and summary["teacher/test_acc"] is not None
    for k, n in ((0, 20), (1, 40)):
        rows = [json.loads(line) for line in (tmp_path / "rounds" / str(k) / "teacher" / "metrics.jsonl").read_text()
                .splitlines()]
        assert (tmp_path / "rounds" / str(k) / "teacher.pt").is_file()
        assert max(r["step"] for r in rows) == 4  # 4 steps of one batch: its n labeled images
        assert json.loads((tmp_path / "rounds" / str(k) / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("overrides, words", [
    (("active.initial=2000",), "label 2060 images, but the pool holds"),
    (("active.query=0",), "active.query=0 is not allowed"),
    (("active.heuristic=coreset",), "active.heuristic=coreset is not allowed"),
    (("active.heuristic=bald",), "no dropout layer with p > 0; set student.drop_rate"),
])
def test_a_bad_setting_is_one_sentence_before_any_training(tmp_path, overrides, words):
    cfg = make_cfg("active=margin", "active.initial=20", "active.query=20", "active.rounds=3", *FAST, *overrides)
    with pytest.raises(KdrunError, match=words) as e:
        run(cfg, tmp_path)
    assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)
    assert not (tmp_path / "rounds" / "0" / "checkpoints").exists()


def test_the_cli_refuses_an_unknown_heuristic_listing_the_known_ones(tmp_path):
    proc = kdrun("active=coreset", "dataset=digits", "logger=none", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "active" in proc.stderr and "margin" in proc.stderr
