"""Data-free distillation (DeepInversion, DFAD): the losses against hand values, the adversarial game's signs, that
no training image is read, and both methods end to end on digits."""

import json
import math
import os
import signal

import pytest
import torch
from conftest import make_cfg

from kdrun import data as kdata
from kdrun import models
from kdrun.engine import Interrupted
from kdrun.errors import KdrunError
from kdrun.losses.data_free import (
    bn_statistics_loss,
    class_entropy,
    js_divergence,
    l2_prior,
    total_variation,
)
from kdrun.methods.deepinversion import BNStatistics, DeepInversion
from kdrun.methods.dfad import DFAD
from kdrun.run import run
from kdrun.teacher import get_teacher


def _cnn(width=4):
    return models.create("cnn", 10, in_chans=1, width=width)


def _digits():
    return kdata.build(make_cfg("dataset=digits").dataset)


def test_bn_loss_is_the_distance_of_the_batch_statistics_to_the_stored_ones():
    features = torch.tensor([1.0, 3.0, 5.0, 7.0]).view(2, 1, 1, 2)  # one channel: mean 4, unbiased variance 20/3
    assert float(bn_statistics_loss(features, torch.tensor([4.0]), torch.tensor([20 / 3]))) == pytest.approx(0, abs=1e-6)
    assert float(bn_statistics_loss(features, torch.tensor([3.0]), torch.tensor([6.0]))) == pytest.approx(1 + 2 / 3)
    two = torch.stack([features[:, 0], 2 * features[:, 0]], 1)  # a second channel: mean 8, variance 80/3
    expected = math.hypot(1, 2) + math.hypot(20 / 3 - 6, 80 / 3 - 20)
    assert float(bn_statistics_loss(two, torch.tensor([3.0, 6.0]), torch.tensor([6.0, 20.0]))) == pytest.approx(expected)


def test_bn_loss_is_zero_exactly_when_every_layer_sees_its_stored_statistics():
    torch.manual_seed(0)
    teacher = _cnn()
    hooks = BNStatistics(teacher)
    assert len(hooks.layers) == 3
    for layer in hooks.layers:
        layer.momentum = 1.0  # a train-mode forward stores this batch's statistics, every layer's
    x = torch.randn(32, 1, 8, 8)
    with hooks:
        teacher.train()(x)
    assert float(hooks.loss().detach()) == pytest.approx(0, abs=1e-5) and len(hooks.losses) == 3
    with hooks:
        teacher.eval()(torch.randn(32, 1, 8, 8) * 2 + 1)  # another batch: other statistics
    assert float(hooks.loss().detach()) > 0.5
    assert not any(layer._forward_hooks for layer in hooks.layers)  # the hooks leave with the context


def test_image_priors_on_fixed_images_match_hand_values():
    image = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    x = torch.cat([image, torch.zeros_like(image)])  # a flat image adds nothing; the batch mean halves it
    across, down, diagonal, anti = math.hypot(1, 2), math.hypot(2, 3), 4.0, 1.0  # 1-0, 4-2 | 2-0, 4-1 | 4-0 | 2-1
    assert float(total_variation(x)) == pytest.approx((across + down + diagonal + anti) / 2)
    assert float(l2_prior(x)) == pytest.approx(math.sqrt(0 + 1 + 4 + 16) / 2)


def test_js_divergence_against_hand_values():
    uniform, certain = torch.zeros(1, 2), torch.tensor([[60.0, -60.0]])  # p = (1/2, 1/2), q = (1, 0)
    m = (0.75, 0.25)
    kl_pm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_qm = math.log(1 / m[0])
    assert float(js_divergence(uniform, certain)) == pytest.approx(0.5 * (kl_pm + kl_qm), rel=1e-5)
    assert float(js_divergence(certain, certain)) == pytest.approx(0, abs=1e-7)
    assert float(js_divergence(certain, -certain)) == pytest.approx(math.log(2), rel=1e-5)


def test_class_entropy_is_the_entropy_of_the_batch_mean_softmax():
    one_class = torch.tensor([[9.0, 0.0], [9.0, 0.0]])  # p_bar = (1 / (1 + e^-9), ...)
    q = 1 / (1 + math.exp(9))
    assert float(class_entropy(one_class)) == pytest.approx(-(q * math.log(q) + (1 - q) * math.log(1 - q)), rel=1e-3)
    two_classes = torch.tensor([[9.0, 0.0], [0.0, 9.0]])  # p_bar = (1/2, 1/2) whatever each image's confidence
    assert float(class_entropy(two_classes)) == pytest.approx(math.log(2), rel=1e-6)


def test_dfad_balance_term_is_dafl_entropy_and_spreads_the_teachers_classes():
    torch.manual_seed(0)
    teacher = _cnn(8)
    with torch.no_grad():
        models.classifier(teacher)[1].weight.mul_(100)  # confident: the generated images start in few classes
    method = DFAD(_cnn(), teacher, nz=16, generator_width=8, balance_weight=2.0)
    method.setup(_digits())
    method.train()
    z = torch.randn(64, 16)
    with torch.no_grad():
        loss, entropy = method.generator_loss(z)
        x = method.generator(z)
        t = method.teacher(x)
        p_bar = t.softmax(1).mean(0)
        by_hand = -(method.student(x) - t).abs().mean() + 2.0 * (p_bar * p_bar.log()).sum()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(entropy) == pytest.approx(float(-(p_bar * p_bar.log()).sum()), rel=1e-5)
    # the entropy term alone, stepped, spreads the teacher's predictions on the generated images
    optimizer = torch.optim.Adam(method.generator.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        (-class_entropy(method.teacher(method.generator(z)))).backward()
        optimizer.step()
    with torch.no_grad():
        assert float(class_entropy(method.teacher(method.generator(z)))) > float(entropy) + 0.2


def test_dfad_generator_and_student_play_the_same_discrepancy_with_opposite_signs():
    torch.manual_seed(0)
    method = DFAD(_cnn(), _cnn(8), nz=16, generator_width=8)
    method.setup(_digits())
    method.train()
    z = torch.randn(32, 16)
    student, (generator, _) = method.student_loss(z), method.generator_loss(z)
    assert float(student) > 0 and float(generator) == pytest.approx(-float(student), rel=1e-6)
    # a small gradient step of each player on its own objective moves the shared discrepancy its way
    before = float(student)
    method.generator_loss(z)[0].backward()
    torch.optim.SGD(method.generator.parameters(), lr=1e-3).step()
    after_generator = float(method.student_loss(z))
    assert after_generator > before
    method.zero_grad()
    method.student_loss(z).backward()
    assert all(p.grad is None for p in method.generator.parameters())  # the student's loss leaves G alone
    torch.optim.SGD(method.student.parameters(), lr=1e-3).step()
    assert float(method.student_loss(z)) < after_generator


def test_deepinversion_refuses_a_teacher_without_batchnorm():
    mlp = models.create("mlp", 10, in_chans=1, image_size=8)
    with pytest.raises(KdrunError, match="no BatchNorm layer; use method=dfad"):
        DeepInversion(_cnn(), mlp).setup(_digits())
    DeepInversion(_cnn(), mlp, bn_weight=0).setup(_digits())  # the priors and CE alone


def test_deepinversion_synthesis_meets_the_targets_and_statistics():
    torch.manual_seed(0)
    data = _digits()
    teacher = _cnn(8)
    method = DeepInversion(_cnn(), teacher, synthesis_steps=1)
    method.setup(data)
    _, _, first = method.invert(40)
    method.synthesis_steps = 60
    x, y, terms = method.invert(40)
    assert terms["bn"] < first["bn"] and terms["ce"] < first["ce"]  # optimising the pixels lowers both
    low, high = method.pixel_range("cpu")
    assert (x >= low).all() and (x <= high).all() and torch.equal(torch.bincount(y), torch.full((10,), 4))


class _Untouchable:
    """Stands in for the training images: any use of them fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a training image was read (images.{name})")


DIGITS_RUN = ("dataset=digits", "teacher.epochs=6", "schedule.batch_size=64", "schedule.epochs=3")
SMALL = {  # a few seconds each
    "deepinversion": ["method.rounds=2", "method.batches_per_round=1", "method.synthesis_batch_size=100",
                      "method.synthesis_steps=30"],
    "dfad": ["method.n_student_steps=2", "method.generator_width=16", "method.nz=32"],
}


def _without_training_images(monkeypatch, *overrides):
    """Train and cache the digits teacher of `overrides` (its provider's work, on the real data), then make every
    later `kdata.build` hand out a training set whose images cannot be touched."""
    cfg = make_cfg(*DIGITS_RUN, *overrides)
    get_teacher(cfg, kdata.build(cfg.dataset), "cpu")
    build = kdata.build

    def without(dataset_cfg):
        data = build(dataset_cfg)
        data.splits.train.images = _Untouchable()
        return data

    monkeypatch.setattr(kdata, "build", without)


def test_data_free_runs_read_no_training_image(tmp_path, monkeypatch):
    """A KD run fails on the untouchable images; the data-free runs train, save their image grids and record that
    they read none (the test images still evaluate them)."""
    torch.set_num_threads(1)
    _without_training_images(monkeypatch)
    with pytest.raises(AssertionError, match="a training image was read"):
        run(make_cfg(*DIGITS_RUN, "method=kd", "teacher.cache=false"), tmp_path / "kd")
    for method, extra in SMALL.items():
        summary = run(make_cfg(*DIGITS_RUN, f"method={method}", *extra), tmp_path / method, method_name=method)
        assert summary["data/train_images_read"] == 0 and summary["teacher/test_acc"] > 0.8
        assert 0 <= summary["test/acc"] <= 1 and summary["method"] == method
        grids = sorted(p.name for p in (tmp_path / method / "samples").iterdir())
        assert grids == (["round1.png", "round2.png"] if method == "deepinversion"
                         else ["epoch1.png", "epoch2.png", "epoch3.png"])
        if method == "deepinversion":  # the synthesised set is the method's checkpointed state
            state = torch.load(tmp_path / method / "checkpoints" / "last.pt", weights_only=True)["method"]
            assert state["images"].shape == (200, 1, 8, 8) and int(state["rounds_done"]) == 2
            assert summary["test/acc"] > 0.3  # chance: 0.1


# digits: 20 steps an epoch, 60 in all; DeepInversion's second round starts at step 40 (its images made at step 41),
# DFAD's generator steps every second step: stopped in the middle of each
@pytest.mark.parametrize("method, stop_at", [("deepinversion", 45), ("dfad", 31)])
def test_a_data_free_run_resumes_exactly(tmp_path, monkeypatch, method, stop_at):
    """Stopped by SIGTERM and continued, a run ends where the uninterrupted one does: the synthesised images, the
    generator and its optimizer are the method's checkpointed state, and the random streams the loop's."""
    torch.set_num_threads(1)
    cfg = make_cfg(*DIGITS_RUN, f"method={method}", *SMALL[method], "trainer.checkpoint_every_steps=7")
    whole = run(cfg, tmp_path / "whole")
    cls = DeepInversion if method == "deepinversion" else DFAD
    step = cls.step

    def stopping(self, batch, loop):
        if loop.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, loop)

    monkeypatch.setattr(cls, "step", stopping)
    with pytest.raises(Interrupted):
        run(cfg, tmp_path / "stopped")
    monkeypatch.setattr(cls, "step", step)
    resumed = run(cfg, tmp_path / "stopped")
    for key in ("test/acc", "val/acc", "steps"):
        assert resumed[key] == whole[key]
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "stopped")]
    evaluations = [[r for r in run_rows if "test/acc" in r] for run_rows in rows]  # training rows: other windows
    assert evaluations[1] == evaluations[0] and len(evaluations[0]) == 3
    final = [torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["method"] for d in ("whole", "stopped")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(v, final[1][k]) for k, v in final[0].items()
                                                      if isinstance(v, torch.Tensor))


@pytest.mark.slow
def test_dfad_student_beats_chance_on_digits(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    _without_training_images(monkeypatch, "schedule.epochs=8", "dataset.val_size=null")
    summary = run(make_cfg(*DIGITS_RUN, "method=dfad", "method.n_student_steps=2", "schedule.epochs=8",
                           "dataset.val_size=null"), tmp_path)
    assert summary["test/acc"] > 0.3 and summary["data/train_images_read"] == 0  # chance: 0.1


def test_the_step_clock_carries_no_image_and_keeps_the_epoch_length():
    data = _digits()
    loaders = kdata.Loaders(data, kdata.BatchSpec(reads_training_images=False), 64, 1000, "cpu", seed=0)
    batches = list(loaders.train())
    assert batches == [{"size": 64}] * (len(data.splits.train) // 64)
    assert loaders.summary() == {"data/train_images_read": 0}
    assert kdata.Loaders(data, kdata.BatchSpec(), 64, 1000, "cpu", seed=0).summary() == {}
