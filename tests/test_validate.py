"""The config is checked once, before any data is read or teacher trained: every bad value, unknown key or unset
field is one sentence naming it; every shipped preset passes."""

import re
from importlib.resources import files

import pytest
from PIL import Image

from conftest import make_cfg, one_thread_env
from kdrun import data as kdata, validate
from kdrun.data.sources import digits
from kdrun.errors import KdrunError

# (overrides, the field the sentence must name, the value it must show)
CATALOGUE = [
    (["trainer.grad_clip=-1"], "trainer.grad_clip", "-1"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    (["trainer.checkpoint_every_steps=-1"], "trainer.checkpoint_every_steps", "-1"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size", "0"),
    (["trainer.max_steps=-5"], "trainer.max_steps", "-5"),
    (["trainer.precision=64"], "trainer.precision", "64"),
    (["trainer.eval_every=0"], "trainer.eval_every", "0"),
    (["trainer.num_workers=-1"], "trainer.num_workers", "-1"),
    (["trainer.compile=maybe"], "trainer.compile", "maybe"),
    (["trainer.snapshot_epochs=[0]"], "trainer.snapshot_epochs", "[0]"),
    (["+trainer.max_step=10"], "trainer.max_step", "max_steps"),
    (["trainer.early_stopping_patience=3", "dataset.val_size=null"], "trainer.early_stopping_patience", "3"),  # no val
    (["schedule.batch_size=0"], "schedule.batch_size", "0"),
    (["schedule.batch_size=12.5"], "schedule.batch_size", "12.5"),
    (["schedule.epochs=-1"], "schedule.epochs", "-1"),
    (["schedule.lr_schedule=linear"], "schedule.lr_schedule", "linear"),
    (["schedule.warmup_epochs=-1"], "schedule.warmup_epochs", "-1"),
    (["schedule.optimizer.lr=-0.1"], "schedule.optimizer.lr", "-0.1"),
    (["+schedule.epoch=3"], "schedule.epoch", "epochs"),
    (["dataset=image_folder"], "dataset.root", "dataset.root="),  # unset
    (["dataset.val_size=-1"], "dataset.val_size", "-1"),
    (["dataset.labeled_per_class=0"], "dataset.labeled_per_class", "0"),
    (["dataset.labeled_fraction=1.5"], "dataset.labeled_fraction", "1.5"),
    (["dataset.labeled_per_class=10", "dataset.labeled_fraction=0.1"], "dataset.labeled_fraction", "0.1"),
    (["dataset.split_seed=abc"], "dataset.split_seed", "abc"),
    (["dataset.augment.crop_padding=-2"], "dataset.augment.crop_padding", "-2"),
    (["+dataset.vals_size=0.1"], "dataset.vals_size", "val_size"),
    (["teacher.epochs=0"], "teacher.epochs", "0"),  # a random teacher: neither pretrained nor loaded
    (["teacher.epochs=-3"], "teacher.epochs", "-3"),
    (["teacher.cache=maybe"], "teacher.cache", "maybe"),
    (["teacher.cache_views=0"], "teacher.cache_views", "0"),
    (["teacher.feature_layers=layer3"], "teacher.feature_layers", "layer3"),
    (["+teacher.epoch=3"], "teacher.epoch", "epochs"),
    (["student.drop_rate=1.5"], "student.drop_rate", "1.5"),
    (["student.pretrained=yes"], "student.pretrained", "yes"),
    (["+student.nme=resnet8"], "student.nme", "name"),
    (["method.alpha=2"], "method.alpha", "2"),
    (["method.temperature=-1"], "method.temperature", "-1"),
    (["method.temperature=0"], "method.temperature", "0"),
    (["method.temperature=abc"], "method.temperature", "abc"),
    (["+method.temprature=2"], "method.temprature", "temperature"),
    (["method=fitnet", "method.stages=3"], "method.stages", "3"),
    (["method=fitnet", "method.hint_epochs=2.5"], "method.hint_epochs", "2.5"),
    (["method=dkd", "method.warmup_epochs=0"], "method.warmup_epochs", "0"),
    (["method=mpl", "method.uda_ramp=1"], "method.uda_ramp", "1"),
    (["method=crd", "method.nce_k=0"], "method.nce_k", "0"),
    (["method=noisy_student", "method.iterations=0"], "method.iterations", "0"),
    (["method=supervised", "method.label_smoothing=1.5"], "method.label_smoothing", "1.5"),
    (["method=funmatch", "method.mixup_alpha=-1"], "method.mixup_alpha", "-1"),
    (["method=at", "+method.weigth=5"], "method.weigth", "weight"),
    (["seed=abc"], "seed", "abc"),
    (["seed=1.5"], "seed", "1.5"),
    (["+seeed=1"], "seeed", "seed"),
    (["resume=maybe"], "resume", "maybe"),
]


def _one_sentence(message: str) -> bool:
    return "\n" not in message and re.search(r"[.!?]\s+[A-Z]", message) is None


@pytest.mark.parametrize("overrides, field, value", CATALOGUE, ids=[" ".join(c[0]) for c in CATALOGUE])
def test_a_bad_value_is_one_sentence_naming_the_field(overrides, field, value):
    with pytest.raises(KdrunError) as e:
        validate.check(make_cfg(*overrides))
    message = str(e.value)
    assert f"{field}=" in message or f"key {field}" in message or f"{field} has no value" in message, message
    assert value in message and _one_sentence(message), message


def test_the_catalogue_spans_every_group():
    groups = {c[1].split(".")[0] for c in CATALOGUE}
    assert {"trainer", "schedule", "dataset", "teacher", "student", "method", "seed"} <= groups
    assert len(CATALOGUE) >= 30


def _presets(group: str) -> list[str]:
    """Every option of a config group, sub-folders included (method=crd/kd), less the `_`-prefixed partials."""
    root = files("kdrun.conf").joinpath(group)
    found = []

    def walk(folder, prefix):
        for p in folder.iterdir():
            if p.is_dir() and not p.name.startswith("_"):
                walk(p, f"{prefix}{p.name}/")
            elif p.name.endswith(".yaml") and not p.name.startswith("_"):
                found.append(prefix + p.name[:-5])
    walk(root, "")
    return sorted(found)


@pytest.mark.parametrize("group", ["method", "dataset", "teacher", "student", "schedule", "trainer", "logger"])
def test_every_shipped_option_passes(group):
    for option in _presets(group):
        root = ["dataset.root=/data"] if option in ("image_folder", "imagenet") else []
        validate.check(make_cfg(f"{group}={option}", *root))


def test_every_experiment_preset_passes():
    presets = _presets("experiment")
    assert len(presets) >= 20
    needs = {"consolidation/imagenet_resnet50": ["method.teachers.1.checkpoint=/task.pt"]}  # the user's own teacher
    for option in presets:
        validate.check(make_cfg(f"experiment={option}", "dataset.root=/data", *needs.get(option, [])))
    validate.check(make_cfg("hparams_search=kd_optuna"))


def test_method_options_come_from_the_class_signature():
    from kdrun.methods.eskd import ESKD
    from kdrun.methods.fitnet import FitNet

    # ESKD takes KD's options through **kd; FitNet its own and FeatureMethod's
    assert set(validate.method_fields(ESKD)) == {"stop_epoch", "stop_fraction", "temperature", "alpha", "kd_weight",
                                                 "logit_standardization", "ls_std_correction"}
    fields = validate.method_fields(FitNet)
    assert fields["stages"] == "int {1, 2}" and fields["temperature"] == "float (0, inf)"
    assert fields["student_layers"] is None  # unannotated, unranged: anything
    for spec in list(validate.FIELDS.values()) + ["int [1, inf)", "float? (0, 1]", "list[str]?", "any {a, b}"]:
        validate._parse(spec)
    with pytest.raises(ValueError, match="bad field spec"):
        validate._parse("float [0, 1")


def test_a_refused_run_reads_no_data_and_writes_nothing(tmp_path):
    from kdrun.run import run

    cfg = make_cfg("dataset=digits", "trainer.grad_clip=-1", f"paths.cache_dir={tmp_path / 'cache'}",
                   f"paths.data_dir={tmp_path / 'data'}")
    with pytest.raises(KdrunError, match="trainer.grad_clip=-1"):
        run(cfg, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, field", [
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1"),
    ("+method.temprature=2", "method.temprature"),
    ("seed=abc", "seed=abc"),
    ("dataset=image_folder", "dataset.root"),
    ("teacher.epochs=0", "teacher.epochs=0"),
])
def test_the_command_line_refuses_a_bad_value_in_one_line(tmp_path, override, field):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "kdrun", "dataset=digits", "logger=none", override,
                           f"paths.cache_dir={cache}", f"paths.data_dir={tmp_path / 'data'}"], cwd=tmp_path,
                          env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("kdrun: error:"), proc.stderr
    assert not cache.exists() and not (tmp_path / "data").exists()


# ---- tracebacks that became sentences --------------------------------------------------------------------
def _folder(root, per_class: int = 3):
    """An image folder of digits, `per_class` PNGs of each class in train/ and val/; the paths, train/ first."""
    d = digits()
    paths = []
    for split, part in (("train", d.train), ("val", d.test)):
        for i in [int(i) for c in range(10) for i in (part.labels == c).nonzero()[:per_class, 0]]:
            folder = root / split / f"class_{part.labels[i].item()}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
            paths.append(folder / f"{i}.png")
    return paths


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_image_in_a_folder_is_named(tmp_path, num_workers):
    paths = _folder(tmp_path)
    bad = sorted(paths[:30])[15]  # mid-way through train/
    bad.write_bytes(bad.read_bytes()[:40])
    data = kdata.build(make_cfg("dataset=image_folder", f"dataset.root={tmp_path}").dataset)
    loader = kdata.Loaders(data, kdata.BatchSpec(), 4, 8, "cpu", seed=0, num_workers=num_workers).train()
    with pytest.raises(KdrunError) as e:
        for _ in loader:
            pass
    message = str(e.value)
    assert str(bad) in message and "dataset.skip_bad_images=true" in message and _one_sentence(message), message


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path, caplog):
    paths = _folder(tmp_path)
    for bad in (paths[3], paths[17], paths[40]):  # two training images, one test image
        bad.write_bytes(b"not an image")
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.skip_bad_images=true",
                   "dataset.val_size=null")  # every kept training image is counted
    data = kdata.build(cfg.dataset)
    assert (len(data.splits.train), len(data.splits.test)) == (28, 29)
    assert "left out 2 unreadable images of train/ and 1 of val/" in caplog.text
    loader = kdata.Loaders(data, kdata.BatchSpec(), 4, 8, "cpu", seed=0).train()
    assert sum(len(b["label"]) for b in loader) == 28  # every kept image is read


@pytest.mark.parametrize("overrides", [
    ["teacher.feature_layers=[fc:in]"],   # a map guided onto a vector hint
    ["student.feature_layers=[fc:in]"],   # a vector guided onto a map hint
    ["student=mlp"],                      # a student of vectors only
    ["student=vit_tiny"],                 # tokens (N, C), neither
])
def test_fitnet_says_when_it_cannot_bridge_the_pair(overrides):
    from hydra.utils import instantiate

    from kdrun import models

    cfg = make_cfg("dataset=digits", "method=fitnet", *overrides)
    data = kdata.build(cfg.dataset)
    student, teacher = models.build(cfg.student, data), models.build(cfg.teacher, data)
    method = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    with pytest.raises(KdrunError, match="FitNets' regressor maps the student's guided layer") as e:
        method.setup(data)
    assert "student.feature_layers" in str(e.value) and _one_sentence(str(e.value))
