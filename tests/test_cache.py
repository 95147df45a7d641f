"""The teacher-output cache: what it stores equals what the teacher computes, reuse across runs, rebuilds."""

import logging

import pytest
import torch

import kdrun.run
from conftest import make_cfg
from kdrun import cache, data as kdata, models
from kdrun.errors import KdrunError
from kdrun.methods.funmatch import FunMatch
from kdrun.methods.supervised import Supervised
from kdrun.run import run
from kdrun.teacher import get_teacher

DIGITS = ["dataset=digits", "teacher=mlp", "teacher.epochs=4", "student=mlp", "+student.kwargs.hidden=[32]",
          "schedule.batch_size=64", "schedule.epochs=1", "dataset.val_size=null"]  # all 1437 training images


def _attach(method, data, cfg, batch_size: int = 64):
    """Hand `method` its teacher cache as `kdrun.run.compose` does; its training loader."""
    method.teacher_cache = cache.teacher_cache(method, data, cfg, "cpu")
    return kdata.Loaders(data, method.batch_spec, batch_size, 512, "cpu", seed=0, cache=method.teacher_cache).train()


def _setup(tmp_path, mode: str, *overrides: str):
    """A FunMatch method in `mode` with its teacher cache attached (cache_dir under tmp_path), and its loader."""
    cfg = make_cfg(*DIGITS, "teacher.cache=true", "teacher.cache_views=3", f"paths.cache_dir={tmp_path}", *overrides)
    data = kdata.build(cfg.dataset)
    torch.manual_seed(0)
    teacher = models.build(cfg.teacher, data).eval()  # untrained is enough: outputs are compared
    method = FunMatch(models.build(cfg.student, data), teacher, teacher_view=mode)
    return cfg, data, method, _attach(method, data, cfg)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["consistent", "function_matching", "independent", "fixed"])
def test_cached_outputs_are_the_teachers_outputs_on_the_view_it_would_see(tmp_path, mode):
    cfg, data, method, train = _setup(tmp_path, mode)
    batch = next(iter(train))
    assert "teacher_image" not in batch  # with a cache the teacher's image is never built
    cached = method.teacher_outputs(batch)
    if mode == "fixed":
        clean = kdata.Normalize(data.mean, data.std, "cpu")(data.splits.train.images[batch["index"]])
        assert torch.allclose(cached, method.teacher(clean), atol=1e-5)
    elif mode == "independent":  # the teacher's view is a stored one, the student's a fresh draw
        stored = train.stored.render(train.images, batch["index"], batch["view"], train.augment, train.normalize)
        assert torch.allclose(cached, method.teacher(stored), atol=1e-5)
        assert not torch.equal(stored, batch["image"])
    else:  # the student is fed the stored view itself (mixed, for function matching)
        assert torch.allclose(cached, method.teacher(batch["image"]), atol=1e-5)
    assert ("view" in batch) == (mode != "fixed")


def test_a_method_that_reads_more_than_logits_is_refused(tmp_path):
    cfg = make_cfg(*DIGITS, "teacher.cache=true", f"paths.cache_dir={tmp_path}")
    data = kdata.build(cfg.dataset)
    method = Supervised(torch.nn.Linear(64, 10))
    method.teacher = torch.nn.Linear(64, 10)
    with pytest.raises(KdrunError, match="set teacher.cache=false"):
        cache.teacher_cache(method, data, cfg, "cpu")


def test_corrupt_stale_or_tampered_cache_files_are_rebuilt_with_a_message(tmp_path, caplog):
    _setup(tmp_path, "consistent")
    (path,) = (tmp_path / "logits").glob("*.pt")
    good = torch.load(path, weights_only=True)
    caplog.set_level(logging.INFO, logger="kdrun.cache")
    damage = {
        "is corrupt": lambda: path.write_bytes(b"not a torch file"),
        "was made for another view (stale)": lambda: torch.save(
            {**good, "fields": {**good["fields"], "view": {**good["fields"]["view"], "views": 2}}}, path),
        "fails its checksum": lambda: torch.save({**good, "logits": good["logits"] + 1}, path),
    }
    for message, spoil in damage.items():
        spoil()
        caplog.clear()
        _setup(tmp_path, "consistent")
        assert f"{path} {message}" in caplog.text and "rebuilding it" in caplog.text
        assert torch.equal(torch.load(path, weights_only=True)["logits"], good["logits"])
    caplog.clear()
    _setup(tmp_path, "consistent")
    assert "reusing" in caplog.text and "rebuilding" not in caplog.text


def test_cache_is_reused_by_a_second_run_without_any_teacher_forward(tmp_path, monkeypatch, caplog):
    forwards = []  # teacher forwards over data (the class check's single zero image does not count)

    def counting_get_teacher(*args, **kwargs):
        teacher, acc = get_teacher(*args, **kwargs)
        teacher.register_forward_hook(lambda m, x, out: forwards.append(len(x[0])) if len(x[0]) > 1 else None)
        return teacher, acc

    monkeypatch.setattr(kdrun.run, "get_teacher", counting_get_teacher)
    caplog.set_level(logging.INFO, logger="kdrun.cache")
    args = (*DIGITS, "method=kd", "teacher.cache=true", "teacher.cache_views=2")
    first = run(make_cfg(*args), tmp_path / "a", "kd")
    assert sum(forwards) == 2 * 1437 and "computing the teacher's outputs" in caplog.text  # the cache was built
    forwards.clear()
    second = run(make_cfg(*args), tmp_path / "b", "kd")
    assert forwards == [] and "the teacher does not run" in caplog.text
    assert first["test/acc"] == second["test/acc"]


@torch.no_grad()
def test_an_image_folder_caches_the_clean_view_and_refuses_stored_views(tmp_path):
    from PIL import Image

    images = torch.randint(0, 256, (2, 10, 8, 8), dtype=torch.uint8)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(10):
                Image.fromarray(images[c, i].numpy(), mode="L").save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path / 'data'}", "teacher.cache=true",
                   "teacher=cnn_small", "student=cnn_small", f"paths.cache_dir={tmp_path / 'cache'}")
    data = kdata.build(cfg.dataset)
    teacher = models.build(cfg.teacher, data).eval()
    method = FunMatch(models.build(cfg.student, data), teacher, teacher_view="fixed")
    batch = next(iter(_attach(method, data, cfg, batch_size=8)))
    test_transform = kdata.folder_transforms(data)[1]  # the clean view: resize and centre crop only
    clean = torch.stack([test_transform(data.splits.train[i][0]) for i in batch["index"].tolist()])
    clean = kdata.Normalize(data.mean, data.std, "cpu")(clean)
    assert "teacher_image" not in batch
    assert torch.allclose(method.teacher_outputs(batch), teacher(clean), atol=1e-5)
    with pytest.raises(KdrunError, match="need an in-memory dataset; set teacher.cache=false"):
        consistent = FunMatch(models.build(cfg.student, data), teacher, teacher_view="consistent")
        cache.teacher_cache(consistent, data, cfg, "cpu")


@torch.no_grad()
def test_without_augmentation_every_teacher_view_is_the_clean_image_and_cached_once(tmp_path):
    cfg, data, method, train = _setup(tmp_path, "consistent", "dataset.augment.crop_padding=0")
    batch = next(iter(train))
    assert train.stored is None and "view" not in batch and method.teacher_cache.logits.shape == (1437, 10)
    assert torch.allclose(method.teacher_outputs(batch), method.teacher(batch["image"]), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode, overrides, cached", [
    ("consistent", ["dataset.augment.crop_padding=0"], True),  # un-augmented: the cache is exact
    ("fixed", [], True),  # the teacher sees the clean image whatever the student sees
    ("consistent", [], False),  # augmented views: stored views only when asked for (teacher.cache=true)
])
def test_auto_caches_only_where_the_cache_is_exact(tmp_path, mode, overrides, cached):
    cfg = make_cfg(*DIGITS, "teacher.cache=auto", f"paths.cache_dir={tmp_path}", *overrides)
    data = kdata.build(cfg.dataset)
    method = FunMatch(models.build(cfg.student, data), models.build(cfg.teacher, data).eval(), teacher_view=mode)
    found = cache.teacher_cache(method, data, cfg, "cpu")
    assert (found is not None) == cached and (found is None or found.stored is None)


def test_auto_leaves_a_method_that_reads_more_than_logits_to_its_teacher(tmp_path):
    cfg = make_cfg(*DIGITS, "teacher.cache=auto", "dataset.augment.crop_padding=0", f"paths.cache_dir={tmp_path}")
    method = Supervised(torch.nn.Linear(64, 10))
    method.teacher = torch.nn.Linear(64, 10)
    assert cache.teacher_cache(method, kdata.build(cfg.dataset), cfg, "cpu") is None
    assert not (tmp_path / "logits").exists()


@torch.no_grad()
def test_an_ensembles_cache_holds_every_members_logits(tmp_path):
    from kdrun.methods.multi_teacher import MultiTeacher
    from kdrun.models.ensemble import Ensemble

    cfg = make_cfg(*DIGITS, "teacher.cache=auto", "dataset.augment.crop_padding=0", f"paths.cache_dir={tmp_path}")
    data = kdata.build(cfg.dataset)
    torch.manual_seed(0)
    members = [models.build(cfg.teacher, data).eval() for _ in range(2)]
    method = MultiTeacher(models.build(cfg.student, data), Ensemble(members, ["mlp", "mlp"]))
    method.setup(data)
    batch = next(iter(_attach(method, data, cfg)))
    assert method.teacher_cache.logits.shape == (1437, 2, 10)
    want = torch.stack([m(batch["image"]) for m in members])  # (M, B, K), what the method reads uncached
    torch.testing.assert_close(method.teacher_outputs(batch), want, atol=1e-5, rtol=1e-5)


def test_computing_the_cache_logs_its_progress_without_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    cfg = make_cfg(*DIGITS, f"paths.cache_dir={tmp_path}")
    data = kdata.build(cfg.dataset)
    teacher = models.build(cfg.teacher, data).eval()
    n = len(data.splits.train)
    with caplog.at_level(logging.INFO, logger="kdrun.cache"):
        cache.compute(teacher, data, None, "cpu", 500, (10,))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache: ")]
    batches = -(-n // 500)
    assert [line.split()[2] for line in lines[:-1]] == [f"{i}/{batches}" for i in range(1, batches)]
    assert lines[-1].startswith(f"teacher cache: {batches} batches computed in ")
