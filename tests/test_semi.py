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


@pytest.mark.parametrize("name, magnitude, size, expected", [
    ("Rotate", 5, 32, 15.0), ("Rotate", 27, 224, 81.0),  # degrees: 30 at M = 10, extrapolated beyond
    ("ShearX", 5, 32, 0.15), ("Posterize", 5, 32, 2), ("Solarize", 5, 32, 128), ("SolarizeAdd", 5, 32, 55),
    ("Color", 5, 32, 1.0), ("Sharpness", 10, 32, 1.9), ("Brightness", 0, 32, 0.1),
    ("TranslateX", 5, 32, 2.0), ("TranslateY", 5, 224, 50.0), ("Cutout", 5, 224, 20), ("Cutout", 16, 32, 6),
    ("Invert", 27, 32, None)])
def test_the_authors_scale_maps_a_level_linearly_to_each_operations_maximum(name, magnitude, size, expected):
    # tensorflow/tpu efficientnet autoaugment.py and meta_pseudo_labels/augment.py: level / 10 * maximum;
    # translate and cutout 100 and 40 px on ImageNet, image_size // 8 on CIFAR (MPL)
    assert semi.authors_argument(name, magnitude, size) == pytest.approx(expected) if expected is not None \
        else semi.authors_argument(name, magnitude, size) is None


def _angle(image: torch.Tensor) -> float:
    """The angle (degrees, counter-clockwise) of the bright pixels about the image centre, from their centroid."""
    ys, xs = torch.nonzero(image[0, 0] == 255, as_tuple=True)
    c = (image.shape[-1] - 1) / 2
    return float(torch.rad2deg(torch.atan2(-(ys.float().mean() - c), xs.float().mean() - c)))


def test_the_authors_rotate_at_magnitude_5_turns_the_image_15_degrees():
    x = torch.zeros(1, 1, 65, 65, dtype=torch.uint8)
    x[0, 0, 32, 33:64] = 255  # a ray from the centre to the right: angle 0
    ra = semi.RandAugment(1, 5, scale="noisy_student")
    out = ra._apply("Rotate", x, 1, torch.Generator())
    assert abs(_angle(out)) == pytest.approx(15.0, abs=1.0)
    assert _angle(ra._apply("Rotate", x, -1, torch.Generator())) == pytest.approx(-_angle(out), abs=1.0)
    assert (out[0, 0, 0, 0] == semi.FILL) and abs(_angle(semi.RandAugment(1, 5)._apply("Rotate", x, 1, None))) \
        == pytest.approx(5.0, abs=1.0)  # torchvision's bin 5 of 0..30 rotates 5 degrees, filled black
    dot = torch.zeros(1, 1, 65, 65, dtype=torch.uint8)
    dot[0, 0, 32, 20] = 255
    shifted = ra._apply("TranslateX", dot, 1, torch.Generator())  # 65 px: 65 // 8 = 8 px at M = 10, 4 px at M = 5
    assert torch.nonzero(shifted[0, 0] == 255).tolist() in ([[32, 16]], [[32, 24]])


@pytest.mark.parametrize("scale", ["noisy_student", "mpl"])
@pytest.mark.parametrize("chans", [1, 3])
def test_every_authors_operation_runs_on_a_uint8_batch(scale, chans):
    x = torch.randint(0, 256, (4, chans, 16, 16), dtype=torch.uint8)
    ra = semi.RandAugment(2, 27, scale=scale)
    for name, signed in ra.ops:
        out = ra._apply(name, x, -1 if signed else 1, torch.Generator().manual_seed(0))
        assert out.dtype == torch.uint8 and out.shape == x.shape, name
    assert ("SolarizeAdd" in dict(ra.ops)) == (scale == "noisy_student") and len(ra.ops) == 16 - (scale == "mpl")


@pytest.mark.parametrize("scale", ["torchvision", "noisy_student", "mpl"])
def test_randaugment_draws_are_reproducible_from_the_generator(scale):
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).expand(64, 3, 16, 16).contiguous()
    ra = semi.RandAugment(num_ops=2, magnitude=9, scale=scale)
    a, b = ra(x, torch.Generator().manual_seed(0)), ra(x, torch.Generator().manual_seed(0))
    c = ra(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(x[0], x[1])
    assert len({img.numpy().tobytes() for img in a}) > 20  # drawn per image
    unchanged = sum(torch.equal(img, x[0]) for img in a)
    if scale == "mpl":  # each operation happens with the image's probability in [0.2, 0.8]
        assert unchanged >= 2


def test_randaugment_scales_and_their_ranges():
    with pytest.raises(KdrunError, match="scale 'paper' is unknown"):
        semi.RandAugment(2, 9, scale="paper")
    with pytest.raises(KdrunError, match="outside 0..30 on the authors' scale"):
        semi.RandAugment(2, 31, scale="mpl")
    assert semi.RandAugment(2, 27, scale="noisy_student").magnitude == 27
    semi.Stream(ratio=1, randaugment={"num_ops": 2, "magnitude": 27, "scale": "noisy_student"})


def test_the_paper_presets_use_the_authors_scale_and_the_measured_ones_torchvision():
    for method, magnitude in (("noisy_student", 27), ("mpl", 16)):  # Xie et al.'s M, Pham et al.'s augment_magnitude
        ra = make_cfg(f"method={method}").method.randaugment
        assert (ra.scale, ra.magnitude) == (method, magnitude)
    for arm in ("noisy_student", "mpl"):  # measured on torchvision's scale (README)
        ra = make_cfg(f"experiment=self_training/fashion_mnist_{arm}").method.randaugment
        assert (ra.scale, ra.magnitude) == ("torchvision", 9)


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
