"""The labeled/unlabeled split, the unlabeled stream and RandAugment (kdrun/data/semi.py)."""

import json

import pytest
import torch

from conftest import make_cfg
from kdrun import data as kdata
from kdrun.data import semi
from kdrun.data.loaders import Normalize
from kdrun.errors import KdrunError
from kdrun.teacher import cache_key


def _digits(*overrides, val_size="null"):
    """Digits' 1437 training images, by default every one of them labeled or unlabeled (no validation split)."""
    return kdata.build(make_cfg("dataset=digits", f"dataset.val_size={val_size}", *overrides).dataset)


def test_split_is_stratified_disjoint_and_reproducible():
    labels = _digits().splits.train.labels
    labeled, unlabeled = semi.split_indices(labels, labeled_per_class=7, seed=3)
    assert torch.bincount(labels[labeled]).tolist() == [7] * 10
    assert len(set(labeled.tolist()) & set(unlabeled.tolist())) == 0
    assert sorted(labeled.tolist() + unlabeled.tolist()) == list(range(len(labels)))
    again, _ = semi.split_indices(labels, labeled_per_class=7, seed=3)
    other, _ = semi.split_indices(labels, labeled_per_class=7, seed=4)
    assert torch.equal(labeled, again) and not torch.equal(labeled, other)
    by_fraction, _ = semi.split_indices(labels, labeled_fraction=0.1, seed=0)
    counts = torch.bincount(labels)
    assert torch.bincount(labels[by_fraction]).tolist() == [round(0.1 * int(n)) for n in counts]


@pytest.mark.parametrize("kwargs, message", [
    ({"labeled_per_class": 5, "labeled_fraction": 0.1}, "not both"),
    ({}, "give one of"),
    ({"labeled_per_class": 10}, "takes all 10 training images of class 0 .* take at most 9 per class"),
    ({"labeled_fraction": 1.5}, "between 0 and 1"),
])
def test_bad_split_settings_name_the_fix(kwargs, message):
    with pytest.raises(KdrunError, match=message):
        semi.split_indices(torch.arange(100) % 10, **kwargs)


def test_the_split_cuts_the_training_set_is_recorded_and_keys_the_teacher():
    data = _digits("dataset.labeled_per_class=5")
    assert len(data.splits.train) == 50 and len(data.labeled_split.unlabeled) == 1437 - 50
    assert torch.equal(data.splits.train.labels, _digits().splits.train.labels[data.labeled_split.labeled_index])
    record = json.loads(json.dumps(data.split_record()))  # what the run writes to split.json
    assert record["labeled_per_class"] == 5 and record["labeled_index"] == data.labeled_split.labeled_index.tolist()
    assert record["num_unlabeled"] == 1387 and sum(record["unlabeled_per_class"]) == 1387
    held = _digits("dataset.labeled_per_class=5", val_size=0.1)  # validation images are neither labeled nor unlabeled
    assert len(held.val) > 0 and len(held.val) + 50 + len(held.labeled_split.unlabeled) == 1437
    keys = {cache_key(make_cfg("dataset=digits", *o)) for o in
            [(), ("dataset.labeled_per_class=5",), ("dataset.labeled_per_class=6",),
             ("dataset.labeled_per_class=5", "dataset.split_seed=1")]}
    assert len(keys) == 4  # a teacher trained on one labeled part is never reused for another
    whole = ("dataset=digits", "dataset.val_size=null")  # no split at all: the seed draws nothing
    assert cache_key(make_cfg(*whole, "dataset.split_seed=1")) == cache_key(make_cfg(*whole))


def test_randaugment_draws_per_image_and_follows_the_generator():
    x = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8).expand(64, 1, 12, 12).contiguous()
    ra = semi.RandAugment(num_ops=2, magnitude=20)
    a = ra(x, torch.Generator().manual_seed(0))
    b = ra(x, torch.Generator().manual_seed(0))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert len({img.numpy().tobytes() for img in a}) > 20  # one image, many different augmentations
    assert torch.equal(x[0], x[1])  # the input is left alone
    with pytest.raises(KdrunError, match="magnitude 40 is outside 0..30"):
        semi.RandAugment(2, 40)


def test_unlabeled_stream_sits_beside_the_labeled_batches():
    data = _digits("dataset.labeled_per_class=5")
    stream = semi.Stream(ratio=3, randaugment={"num_ops": 2, "magnitude": 9}, weak_view=True)
    loader = semi.loader(data, stream, 16, "cpu", seed=0)
    assert len(loader) == 50 // 16  # an epoch: one pass over the labeled images, as without a split
    b = next(iter(loader))
    assert b["image"].shape == (16, 1, 8, 8) and b["unlabeled_image"].shape == (48, 1, 8, 8)
    assert b["unlabeled_weak_image"].shape == (48, 1, 8, 8) and "unlabeled_label" not in b
    assert not torch.equal(b["unlabeled_image"], b["unlabeled_weak_image"])
    seen = torch.cat([b["unlabeled_index"], *(c["unlabeled_index"] for _ in range(10) for c in loader)])
    assert len(set(seen[:1387].tolist())) == 1387  # the stream runs on across epochs: one full pass first
    plain = kdata.Loaders(data, kdata.BatchSpec(unlabeled=stream), 16, 500, "cpu", seed=0).evaluation(
        kdata.EvalSet("unlabeled", "unlabeled"))
    clean = torch.cat([c["image"] for c in plain])
    assert torch.equal(clean, Normalize(data.mean, data.std, "cpu")(data.labeled_split.unlabeled.images))
    state = loader.state_dict()
    first = next(iter(loader))
    loader.load_state_dict(state)
    again = next(iter(loader))
    assert torch.equal(again["unlabeled_index"], first["unlabeled_index"])
    assert torch.equal(again["unlabeled_image"], first["unlabeled_image"])


def test_a_method_with_an_unlabeled_stream_needs_a_split_and_a_valid_stream():
    with pytest.raises(KdrunError, match="dataset.labeled_per_class=N"):
        semi.loader(_digits(), semi.Stream(ratio=1), 16, "cpu", seed=0)
    with pytest.raises(KdrunError, match="give a positive number"):
        semi.Stream(ratio=0)
    with pytest.raises(KdrunError, match="give num_ops and magnitude"):
        semi.Stream(ratio=1, randaugment={"n": 2, "m": 9})


@pytest.mark.parametrize("arm", ["supervised", "pseudo_label", "noisy_student", "mpl", "data_distillation"])
def test_the_fashion_mnist_comparison_presets_share_the_split_and_batches(arm):
    cfg = make_cfg(f"experiment=self_training/fashion_mnist_{arm}")
    epochs = 240 if arm == "mpl" else 40  # MPL's student learns from a teacher that starts untrained
    assert (cfg.dataset.labeled_per_class, cfg.schedule.epochs, cfg.schedule.batch_size) == (100, epochs, 64)
    assert cfg.method._target_.rsplit(".", 2)[-2] == arm
