"""Curricula (kdrun/curriculum.py): EfficientTrain's frequency crop and schedule, easy-first pacing and draws,
the per-epoch rows in metrics.jsonl, and exact resumption."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import kdrun, make_cfg, preempted
from kdrun import cache, data as kdata
from kdrun.curriculum import EasyFirst, EfficientTrain, band_limited_resize, check_models, low_pass_crop, pace
from kdrun.data.loaders import Normalize, TensorLoader
from kdrun.data.sources import InMemory, Splits
from kdrun.engine import Engine, Interrupted
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.methods.kd import KD
from kdrun.methods.supervised import Supervised
from kdrun.models import create


def _wave(n: int, ky: int, kx: int, amplitude: float) -> torch.Tensor:
    """amplitude x cos(2 pi (ky y + kx x) / n) on an n x n grid."""
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    return amplitude * torch.cos(2 * math.pi * (ky * y + kx * x) / n)


@pytest.mark.parametrize("n, band", [(28, 20), (28, 24), (8, 7), (32, 23)])
def test_the_frequency_crop_keeps_exactly_the_central_band(n, band):
    low, high = (2, 3), (band // 2 + 1, 1)  # |frequency| below band/2, and one above it in y
    x = 0.4 + _wave(n, *low, 0.25) + _wave(n, *high, 0.3)
    out = low_pass_crop(x[None, None], band)[0, 0].double()
    assert out.shape == (band, band)
    assert torch.allclose(out, 0.4 + _wave(band, *low, 0.25), atol=1e-5)  # the low one at its amplitude, the high gone


def test_a_constant_image_keeps_its_value_and_a_full_band_changes_nothing():
    x = torch.full((3, 1, 28, 28), 0.7)
    assert torch.allclose(low_pass_crop(x, 20), torch.full((3, 1, 20, 20), 0.7), atol=1e-6)
    assert low_pass_crop(x, 28) is x and low_pass_crop(x, 40) is x


def test_the_teachers_full_size_view_is_the_same_band_at_the_full_size():
    x = 0.1 + _wave(28, 3, 1, 0.5) + _wave(28, 13, 0, 0.2)
    full = band_limited_resize(low_pass_crop(x[None, None], 20), (28, 28))[0, 0].double()
    assert torch.allclose(full, 0.1 + _wave(28, 3, 1, 0.5), atol=1e-5)


def _digits_like(n: int = 200, size: int = 8) -> InMemory:
    g = torch.Generator().manual_seed(0)
    return InMemory(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


@pytest.mark.parametrize("size, epochs, bands, magnitudes", [
    # the authors' B = 160, 160, 160, 192, 224 of 224 and rand-m1, m3, ..., m9; segment i ends at int(E / 5 (i + 1))
    (28, 10, [20, 20, 20, 20, 20, 20, 24, 24, 28, 28], [3, 3, 9, 9, 15, 15, 21, 21, 27, 27]),
    (28, 4, [20, 20, 24, 28], [9, 15, 21, 27]),  # int(0.8) = 0: the first segment gets no epoch
    (8, 7, [6, 6, 6, 6, 7, 8, 8], [3, 9, 15, 15, 21, 27, 27]),  # ends 1, 2, 4, 5, 7; round(8 x 160 / 224) = 6
])
def test_the_efficienttrain_schedule_per_epoch(size, epochs, bands, magnitudes):
    et = EfficientTrain()
    et.setup(kdata.Data("x", Splits(_digits_like(size=size), _digits_like(size=size), 10, 1, size), [0.5], [0.5], {}),
             "cpu", 100)
    rows = [et.set_epoch(e, epochs) for e in range(epochs)]
    assert [r["curriculum/band"] for r in rows] == bands
    assert [r["curriculum/magnitude"] for r in rows] == magnitudes


def test_efficienttrain_views_shrink_and_the_teacher_sees_them_at_full_size():
    et = EfficientTrain(bands=[7, 8], magnitudes=[9, 9], reference_size=8)  # an odd band: no Nyquist frequency
    et.image_size = 8
    assert et.set_epoch(0, 2)["curriculum/band"] == 7
    loader = TensorLoader(_digits_like(), 32, Normalize([0.5], [0.5], "cpu"), "cpu", shuffle=True, drop_last=True,
                          curriculum=et)
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 1, 7, 7) and batch["teacher_image"].shape == (32, 1, 8, 8)
    assert torch.allclose(low_pass_crop(batch["teacher_image"], 7), batch["image"], atol=1e-5)  # the same frequencies


def test_the_pacing_functions():
    assert [pace("linear", 0.2, 0.5, t) for t in (0, 0.25, 0.5, 0.75)] == pytest.approx([0.2, 0.6, 1, 1])
    assert [pace("exponential", 0.2, 0.5, t) for t in (0, 0.25, 0.5, 1)] == pytest.approx([0.2, 0.2 ** 0.5, 1, 1])
    assert pace("linear", 0.3, 0, 0) == 1  # no ramp: everything at once


@pytest.mark.parametrize("positions", [None, torch.arange(0, 200, 2)])
def test_easy_first_draws_only_from_the_easiest_fraction(positions):
    data = _digits_like()
    easy = EasyFirst(pacing="linear", start=0.25, ramp=0.5)
    easy.scores = torch.rand(200, generator=torch.Generator().manual_seed(1))
    loader = TensorLoader(data, 16, Normalize([0.5], [0.5], "cpu"), "cpu", shuffle=True, drop_last=True,
                          curriculum=easy, positions=positions)
    pool = torch.arange(200) if positions is None else positions
    assert loader.set_epoch(0, 4) == {"curriculum/fraction": 0.25}
    batches = list(loader)
    k = math.ceil(0.25 * len(pool))
    easiest = set(pool[easy.scores[pool].argsort()[:k]].tolist())
    drawn = torch.cat([b["index"] for b in batches])
    assert len(batches) == len(pool) // 16 and set(drawn.tolist()) <= easiest  # all steps, from the easiest only
    assert len(set(drawn.tolist())) > 0.8 * k and all(len(set(b["index"].tolist())) == 16 for b in batches)
    assert loader.set_epoch(2, 4) == {"curriculum/fraction": 1.0}  # ramp reached: one pass over every image
    drawn = torch.cat([b["index"] for b in loader])
    assert len(set(drawn.tolist())) == len(drawn) == len(pool) // 16 * 16


def test_the_teacher_cache_is_off_or_refused_when_the_views_change():
    cfg = make_cfg("dataset=digits", "teacher=mlp", "student=mlp")
    data = kdata.build(cfg.dataset)
    method = KD(create("mlp", 10, in_chans=1, image_size=8), create("mlp", 10, in_chans=1, image_size=8))
    assert cache.teacher_cache(method, data, cfg, "cpu", views_change=True) is None  # auto: not exact
    cfg.teacher.cache = True
    with pytest.raises(KdrunError, match="curriculum changes the training views"):
        cache.teacher_cache(method, data, cfg, "cpu", views_change=True)


def test_what_a_curriculum_cannot_run_with_is_refused_in_one_sentence():
    data = kdata.Data("digits", Splits(_digits_like(), _digits_like(), 10, 1, 8), [0.5], [0.5], {})
    et = EfficientTrain()
    check_models(et, data, "cpu", student=create("cnn", 10, in_chans=1, width=8))  # pools globally: fine
    with pytest.raises(KdrunError, match="shrinks the training images to 6x6 px, and the student takes only 8x8"):
        check_models(et, data, "cpu", student=create("mlp", 10, in_chans=1, image_size=8))
    check_models(et, data, "cpu", teacher=create("mlp", 10, in_chans=1, image_size=8))  # it sees full-size views
    with pytest.raises(KdrunError, match="reads no training image"):
        kdata.check_curriculum(data, kdata.BatchSpec(reads_training_images=False))


def _rows(run_dir, key):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("method", ["kd", pytest.param("dkd", marks=pytest.mark.slow)])  # ~10 s each on idle cores
def test_kdrun_efficienttrain_writes_the_band_per_epoch(tmp_path, method):
    kdrun("curriculum=efficienttrain", "dataset=digits", "logger=none", f"method={method}",
          f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    rows = _rows(tmp_path, "curriculum/band")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and [r["curriculum/band"] for r in rows] == [6, 6, 7, 8]
    assert [r["curriculum/magnitude"] for r in rows] == [9, 15, 21, 27]


def test_kdrun_easy_first_writes_the_fraction_per_epoch_and_a_run_without_teacher_needs_a_scorer(tmp_path):
    kdrun("curriculum=easy_first", "dataset=digits", "logger=none", "method=kd", f"hydra.run.dir={tmp_path / 'kd'}",
          cwd=tmp_path)
    rows = _rows(tmp_path / "kd", "curriculum/fraction")
    assert [r["curriculum/fraction"] for r in rows] == pytest.approx([0.2, 0.2 ** 0.5, 1, 1], abs=1e-6)
    proc = kdrun("curriculum=easy_first", "dataset=digits", "logger=none", "method=supervised",
                 f"hydra.run.dir={tmp_path / 'sup'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "curriculum.scorer=PATH" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_kdrun_easy_first_scores_with_a_scorer_checkpoint(tmp_path):
    kdrun("dataset=digits", "logger=none", "method=supervised", f"hydra.run.dir={tmp_path / 'kd'}", cwd=tmp_path)
    best = tmp_path / "kd" / "checkpoints" / "best.pt"
    kdrun("curriculum=easy_first", f"curriculum.scorer={best}", "dataset=digits", "logger=none", "method=supervised",
          f"hydra.run.dir={tmp_path / 'scored'}", cwd=tmp_path)
    assert len(_rows(tmp_path / "scored", "curriculum/fraction")) == 4


Stops = preempted(Supervised)


@pytest.mark.parametrize("which", ["efficienttrain", "easy_first"])
def test_a_resumed_run_follows_the_same_curriculum(tmp_path, which, one_thread):
    cfg = make_cfg("dataset=digits", "trainer.checkpoint_every_steps=3", "trainer.log_every=5")
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": 3})
    data = kdata.build(cfg.dataset)

    def fit(stop_at, run_dir, resume=None):
        torch.manual_seed(0)
        method = Stops(create("cnn", 10, in_chans=1, width=8), stop_at=stop_at)
        curriculum = EfficientTrain() if which == "efficienttrain" else EasyFirst(start=0.3, ramp=0.6)
        curriculum.setup(data, "cpu", 500, teacher=create("mlp", 10, in_chans=1, image_size=8))
        loaders = kdata.Loaders(data, kdata.BatchSpec(), 64, 500, "cpu", seed=0, curriculum=curriculum)
        logger = RunLogger(run_dir)
        try:
            Engine(method, loaders, schedule, cfg.trainer, run_dir, logger).fit(resume)
        finally:
            logger.close()
        return method

    whole = fit(None, tmp_path / "whole")
    with pytest.raises(Interrupted):
        fit(30, tmp_path / "stopped")  # in the second epoch (20 steps each)
    resumed = fit(None, tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))

    def metrics(run_dir):
        return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in _rows(run_dir, "step")]

    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "whole")
    key = "curriculum/segment" if which == "efficienttrain" else "curriculum/fraction"
    assert len(_rows(tmp_path / "whole", key)) == 3
