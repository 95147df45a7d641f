"""FunMatch (Beyer et al. 2022): what each teacher_view mode feeds to the two networks, and end-to-end runs."""

import importlib
import json

import pytest
import torch
from torch import nn

from conftest import make_cfg
from kdrun.data import BatchSpec
from kdrun.data.loaders import BatchAugment, Normalize, TensorLoader, Views, mixup
from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError
from kdrun.methods.funmatch import FunMatch
from kdrun.run import run

NORM = Normalize([0.5], [0.25], "cpu")
AUGMENT = BatchAugment(crop_padding=2, flip=True)


class Recorder(nn.Module):
    """A small net that keeps a copy of every input it is fed."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _fed(mode: str):
    """One training step of FunMatch in `mode`: (the batch, the student's input, the teacher's input, the data)."""
    torch.manual_seed(0)
    data = InMemory(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), torch.arange(64) % 10)
    method = FunMatch(Recorder(), Recorder(), teacher_view=mode, mixup_alpha=1.0)
    views = Views(method.batch_spec.teacher_view, method.batch_spec.mixup_alpha)
    loader = TensorLoader(data, 32, NORM, "cpu", shuffle=True, drop_last=True, augment=AUGMENT, seed=0, views=views)
    batch = next(iter(loader))
    method.training_step(batch)
    (s,), (t,) = method.student.inputs, method.teacher.inputs
    return batch, s, t, data


def _augmentations(image: torch.Tensor) -> list[torch.Tensor]:
    """Every crop (padding 2) and flip of one uint8 image, normalised."""
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    crops = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    return [NORM(c[None])[0] for crop in crops for c in (crop, crop.flip(2))]


def _is_augmentation_of(x: torch.Tensor, image: torch.Tensor) -> bool:
    return any(torch.equal(x, a) for a in _augmentations(image))


def test_consistent_feeds_both_networks_the_very_same_augmented_image():
    batch, s, t, data = _fed("consistent")
    assert torch.equal(s, t) and "teacher_image" not in batch
    clean = NORM(data.images[batch["index"]])
    assert (s != clean).flatten(1).any(1).float().mean() > 0.5  # augmented, not the clean images
    assert all(_is_augmentation_of(s[i], data.images[j]) for i, j in enumerate(batch["index"].tolist()))


def test_independent_feeds_each_network_its_own_view_of_the_same_image():
    batch, s, t, data = _fed("independent")
    differ = (s != t).flatten(1).any(1)
    assert differ.float().mean() > 0.5  # independent draws (a few coincide by chance)
    for i, j in enumerate(batch["index"].tolist()):
        assert _is_augmentation_of(s[i], data.images[j]) and _is_augmentation_of(t[i], data.images[j])


def test_fixed_feeds_the_teacher_the_clean_image():
    batch, s, t, data = _fed("fixed")
    assert torch.equal(t, NORM(data.images[batch["index"]]))
    assert (s != t).flatten(1).any(1).float().mean() > 0.5


def test_function_matching_mixes_once_and_feeds_both_networks_the_mixed_image(monkeypatch):
    calls = []

    def spy(x, partner, lam):
        calls.append((x.clone(), partner.clone(), lam.clone()))
        return mixup(x, partner, lam)

    loaders_module = importlib.import_module("kdrun.data.loaders")  # not the function kdrun.data.loaders
    monkeypatch.setattr(loaders_module, "mixup", spy)
    batch, s, t, data = _fed("function_matching")
    assert len(calls) == 1  # one draw of partners and coefficients, shared by both networks
    x, partner, lam = calls[0]
    assert torch.equal(s, t)
    assert torch.allclose(s, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * partner)
    assert ((lam > 0) & (lam < 1)).all() and lam.std() > 0.05  # Beta(1, 1): coefficients vary per image
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert all(tuple(p.flatten().tolist()) in rows for p in partner)  # partners: images of the same batch
    assert not torch.equal(partner, x)


def test_mixup_is_a_convex_combination_per_image():
    x, y = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = mixup(x, y, torch.tensor([0.25, 1.0]))
    assert torch.equal(out[0], torch.full((1, 2, 2), 0.75)) and torch.equal(out[1], x[1])


def test_funmatch_loss_ignores_labels_and_other_modes_have_no_mixup():
    batch, *_ = _fed("consistent")
    torch.manual_seed(0)
    method = FunMatch(Recorder(), Recorder(), teacher_view="consistent", mixup_alpha=1.0)
    a = method.training_step(batch)[0]["kl"]
    b = method.training_step({**batch, "label": (batch["label"] + 1) % 10})[0]["kl"]
    assert torch.equal(a, b) and method.batch_spec.mixup_alpha == 0.0
    with pytest.raises(KdrunError, match="use one of fixed, independent, consistent, function_matching"):
        FunMatch(Recorder(), Recorder(), teacher_view="same")
    with pytest.raises(KdrunError, match="clean teacher view"):
        BatchSpec("clean", 1.0)


# a cheap teacher and student on scikit-learn's digits (the same teacher settings in test_eskd and test_cache,
# so the session trains it once)
DIGITS = ["dataset=digits", "teacher=mlp", "teacher.epochs=4", "student=mlp", "+student.kwargs.hidden=[32]",
          "schedule.batch_size=64", "schedule.epochs=1", "dataset.val_size=null"]  # all 1437 training images


@pytest.mark.parametrize("mode", ["fixed", "independent", "consistent", "function_matching"])
def test_funmatch_runs_end_to_end_on_digits(tmp_path, mode):
    summary = run(make_cfg(*DIGITS, "method=funmatch", f"method.teacher_view={mode}"), tmp_path, "funmatch")
    assert summary["steps"] == 1437 // 64 and 0 <= summary["test/acc"] <= 1 and summary["teacher/test_acc"] > 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/kl", "train/agreement"} <= set(rows[0]) and "train/ce" not in rows[0]


def test_the_patient_presets_compose():
    for name in ("fashion_mnist", "cifar100", "imagenet"):
        cfg = make_cfg(f"experiment=funmatch/{name}", "dataset.root=/data")
        assert cfg.method.teacher_view == "function_matching" and cfg.schedule.epochs >= 100
