"""What a model is fed (kdrun/models/inputs.py): `teacher.normalize`/`student.normalize` re-normalise the batch for
one model, and a pretrained model whose own data config disagrees with what it is fed is warned about."""

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg
from kdrun import models
from kdrun.cache import cache_fields
from kdrun.errors import KdrunError
from kdrun.models import inputs
from kdrun.teacher import cache_key

IMAGENET = SimpleNamespace(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
BIT = "timm:resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"


def _data(mean, std, size=32, in_chans=3, num_classes=10):
    return SimpleNamespace(name="fake", mean=mean, std=std, image_size=size, in_chans=in_chans,
                           num_classes=num_classes, splits=SimpleNamespace(test=None))


def _preset(**fields):
    base = {"name": "cnn", "kwargs": {}, "pretrained": False, "normalize": None, "init": None, "freeze": []}
    return OmegaConf.create({"teacher": {**base, **fields}}).teacher


def test_renormalize_maps_the_datasets_normalisation_to_the_models():
    pixels = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    fed = (pixels - m) / s  # what the loaders give
    out = inputs.Renormalize(IMAGENET.mean, IMAGENET.std, HALF["mean"], HALF["std"])(fed)
    torch.testing.assert_close(out, pixels * 2 - 1)  # BiT's [-1, 1]
    assert list(inputs.Renormalize(IMAGENET.mean, IMAGENET.std, HALF["mean"], HALF["std"]).state_dict()) == []


def test_a_model_with_normalize_sees_its_own_normalisation_and_keeps_its_weights_and_paths():
    data = _data(IMAGENET.mean, IMAGENET.std)
    torch.manual_seed(0)
    plain = models.build(_preset(), data).eval()
    own = models.build(_preset(normalize=HALF), data).eval()
    assert list(own.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    own.load_state_dict(plain.state_dict())
    assert own.default_feature_layers == plain.default_feature_layers
    assert all(own.get_submodule(p) is not None for p in own.default_feature_layers)
    pixels = torch.rand(3, 3, 32, 32)
    fed = (pixels - torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)) / torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(own(fed), plain(pixels * 2 - 1))
        assert not torch.allclose(own(fed), plain(fed))
    rebuilt = models.from_arch(models.arch(_preset(normalize=HALF), data)).eval()  # a checkpoint's model
    rebuilt.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(fed), own(fed))


def test_normalize_must_give_a_mean_and_std_per_channel():
    with pytest.raises(KdrunError, match=r"teacher.normalize=.*3 values each"):
        models.build(_preset(normalize={"mean": [0.5], "std": [0.5]}), _data(IMAGENET.mean, IMAGENET.std))


def test_the_teacher_caches_tell_a_renormalised_teacher_apart(monkeypatch):
    assert cache_key(make_cfg("teacher.normalize={mean:[0.5],std:[0.5]}")) != cache_key(make_cfg())
    data = SimpleNamespace(name="fake", mean=[0.5], std=[0.25])
    monkeypatch.setattr("kdrun.cache.split_hash", lambda data: "the training images")
    teacher = models.create("cnn", 10, in_chans=1)
    before = cache_fields(teacher, data, None)
    inputs.renormalize(teacher, data.mean, data.std, {"mean": [0.1], "std": [0.3]}, "teacher.normalize")
    after = cache_fields(teacher, data, None)
    assert "teacher_input" not in before and after["teacher"] == before["teacher"]  # the same weights ...
    assert after != before  # ... fed other inputs: another cache file


def test_a_pretrained_timm_model_fed_another_normalisation_or_size_is_warned_about(caplog):
    timm_model = models.create("timm:test_resnet", 10)  # pretrained=False carries the pretrained_cfg too
    assert timm_model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and timm_model.pretrained_cfg["input_size"][-1] == 160
    cfg = _preset(name="timm:test_resnet", pretrained=True)
    with caplog.at_level(logging.WARNING, logger="kdrun.models.inputs"):
        assert inputs.check_pretrained_input(timm_model, cfg, _data(IMAGENET.mean, IMAGENET.std, 160), "teacher")
        assert "teacher.normalize={mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}" in caplog.text
        assert "dataset.image_size" not in caplog.text
        caplog.clear()
        assert not inputs.check_pretrained_input(timm_model, _preset(name="timm:test_resnet", normalize=HALF),
                                                 _data(IMAGENET.mean, IMAGENET.std, 160), "teacher")
        assert not inputs.check_pretrained_input(timm_model, cfg, _data(HALF["mean"], HALF["std"], 160), "teacher")
        assert caplog.text == ""
        assert inputs.check_pretrained_input(timm_model, cfg, _data(HALF["mean"], HALF["std"], 32), "student")
        assert "dataset.image_size=160" in caplog.text and "normalize" not in caplog.text


def test_a_pretrained_torchvision_model_is_checked_against_its_weights_transforms(caplog):
    model = models.create("resnet18", 10)  # the weights enum carries its transforms' mean/std without a download
    cfg = _preset(name="resnet18", pretrained=True)
    with caplog.at_level(logging.WARNING, logger="kdrun.models.inputs"):
        assert not inputs.check_pretrained_input(model, cfg, _data(IMAGENET.mean, IMAGENET.std, 224), "teacher")
        cifar = _data([0.507, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762], 32)
        assert inputs.check_pretrained_input(model, cfg, cifar, "teacher")
    assert "teacher.normalize={mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}" in caplog.text
    assert "dataset.image_size=224" in caplog.text


def test_the_funmatch_imagenet_preset_feeds_the_bit_teacher_what_its_weights_expect(caplog):
    from timm.models import get_pretrained_cfg

    own = get_pretrained_cfg(BIT.removeprefix("timm:"))  # timm's config for these weights, no download
    assert (own.mean, own.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cfg = make_cfg("experiment=funmatch/imagenet", "dataset.root=/data")
    assert cfg.teacher.name == BIT and cfg.teacher.pretrained
    # no argument of the default cnn presets (width) leaks into the BiT models' constructors
    assert models.constructor_kwargs(cfg.teacher) == {} and models.constructor_kwargs(cfg.student) == {}
    bit = SimpleNamespace(pretrained_cfg=own.to_dict())  # stands in for the 236M-parameter model
    imagenet = _data(list(cfg.dataset.mean), list(cfg.dataset.std), cfg.dataset.image_size)
    with caplog.at_level(logging.WARNING, logger="kdrun.models.inputs"):
        assert not inputs.check_pretrained_input(bit, cfg.teacher, imagenet, "teacher")
        unset = OmegaConf.merge(cfg.teacher, {"normalize": None})  # the preset as it was
        assert inputs.check_pretrained_input(bit, unset, imagenet, "teacher")
    # the authors' recipe at batch 4096, scaled linearly to the preset's batch
    scale = cfg.schedule.batch_size / 4096
    assert cfg.schedule.optimizer.lr == pytest.approx(0.03 * scale)
    assert cfg.schedule.optimizer.lr * cfg.schedule.optimizer.weight_decay == pytest.approx(3e-4 * scale)
    assert cfg.trainer.grad_clip == 1.0
    assert cfg.schedule.warmup_epochs == pytest.approx(5000 * 4096 / 1_281_167, abs=0.5)
