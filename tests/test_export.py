"""After a run: the summary's cost columns, `kdrun-eval` and `kdrun-export` on its run dir, and a model of the
user's own (`_target_`) that trains, distils with a feature method, evaluates and exports."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from conftest import kdrun, make_cfg
from kdrun import checkpoint, data as kdata
from kdrun.run import format_summary
from kdrun.teacher import cache_key
from kdrun.tools import export as kexport
from kdrun.tools.evaluate import evaluate_checkpoint

RUN = ["dataset=digits", "logger=none", "schedule.epochs=2", "trainer.max_steps=40"]


def tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`kdrun-eval` / `kdrun-export` as a user runs them (through their modules, so an uninstalled checkout works)."""
    return subprocess.run([sys.executable, "-m", f"kdrun.tools.{name}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _run_dir(root: Path) -> Path:
    (summary,) = root.glob("outputs/runs/**/summary.json")
    return summary.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished kd run on digits (cnn teacher, cnn_small student)."""
    root = tmp_path_factory.mktemp("run")
    kdrun(*RUN, cwd=root)
    return _run_dir(root)


def _best_test_acc(run: Path) -> float:
    """The test accuracy the run reported for its best.pt (chosen on validation when it holds images out)."""
    summary = json.loads((run / "summary.json").read_text())
    return summary.get("test/acc_at_best_val", summary["test/acc_best"])


def _digits_test(mean, std):
    """The digits test images normalised by hand with `mean`, `std`, and their labels."""
    test = kdata.build(make_cfg("dataset=digits").dataset).splits.test
    images = (test.images.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return images, test.labels


def test_the_summary_compares_the_costs_of_student_and_teacher(run):
    def cnn_flops(w):  # 2 x the multiply-adds of the cnn's 3x3 convolutions (8x8, 4x4, 2x2 maps) and classifier
        return 2 * (w * 1 * 9 * 64 + 2 * w * w * 9 * 16 + 4 * w * 2 * w * 9 * 4 + 4 * w * 9 * 10)

    s = json.loads((run / "summary.json").read_text())
    assert s["student/flops"] == cnn_flops(12) and s["teacher/flops"] == cnn_flops(32)
    assert 0 < s["student/latency_ms"] < 1000 and 0 < s["teacher/latency_ms"] < 1000
    assert "cost     student 0.19M FLOPs" in format_summary(s, run) and "teacher 1.24M FLOPs" in format_summary(s, run)


def test_kdrun_eval_reports_top1_top5_per_class_and_the_confusion_matrix(run, tmp_path):
    proc = tool("evaluate", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = tmp_path.glob("outputs/eval/*/*/eval.json")
    report = json.loads(out.read_text())
    model, ckpt = checkpoint.load_model(run / "checkpoints" / "best.pt")
    images, labels = _digits_test(ckpt["arch"]["mean"], ckpt["arch"]["std"])
    with torch.no_grad():
        logits = model(images)
    assert report["dataset"] == "digits" and report["images"] == len(labels) == 360  # the run's own dataset
    assert report["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert report["top1"] == pytest.approx(_best_test_acc(run))  # what the engine measured of best.pt
    assert report["top5"] == pytest.approx((logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item())
    matrix = json.loads((out.parent / "confusion.json").read_text())["matrix"]
    pred = logits.argmax(1)
    assert matrix == [[int(((labels == i) & (pred == j)).sum()) for j in range(10)] for i in range(10)]
    assert report["per_class_acc"]["3"] == pytest.approx(((pred == 3) & (labels == 3)).sum().item() / (labels == 3).sum().item())
    assert (out.parent / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1" in proc.stdout and "top-5" in proc.stdout


def test_kdrun_eval_on_a_dataset_of_other_classes_is_one_clear_error(run, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("L", (8, 8), 40).save(tmp_path / "data" / split / c / "0.png")
    proc = tool("evaluate", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", "dataset=image_folder",
                f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"kdrun-eval: error: the checkpoint {run / 'checkpoints' / 'best.pt'} predicts the 10 classes of digits but "
        "image_folder has 3 classes; evaluate it on a dataset with the classes it was trained on (dataset=digits)"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_onnx_and_torchscript_give_the_checkpoints_logits_with_the_stored_preprocessing(run, tmp_path):
    import onnxruntime

    best = run / "checkpoints" / "best.pt"
    proc = tool("export", f"ckpt_path={best}", "format=onnx", cwd=tmp_path)  # the default cnn: adaptive pooling
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"kdrun-export: wrote {run / 'checkpoints' / 'best.onnx'}")
    model, _ = checkpoint.load_model(best)
    session = onnxruntime.InferenceSession(str(run / "checkpoints" / "best.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["kdrun.image_size"], meta["kdrun.in_chans"], meta["kdrun.num_classes"]) == ("8", "1", "10")
    images, _ = _digits_test(json.loads(meta["kdrun.mean"]), json.loads(meta["kdrun.std"]))
    assert json.loads(meta["kdrun.mean"]) == [0.3]  # conf/dataset/digits.yaml
    with torch.no_grad():
        expected = model(images).numpy()
    for batch in (images[:1], images):  # the batch size is free
        np.testing.assert_allclose(session.run(None, {"image": batch.numpy()})[0], expected[:len(batch)], atol=1e-4)

    path, _ = kexport.export(best, "torchscript", tmp_path / "student.ts")
    extra = {"kdrun.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    stored = json.loads(extra["kdrun.json"])
    assert json.loads(stored["kdrun.std"]) == [0.4] and stored["kdrun.image_size"] == "8"
    with torch.no_grad():
        np.testing.assert_allclose(scripted(images).numpy(), expected, atol=1e-4)


def test_safetensors_round_trips_the_weights_and_the_architecture(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from kdrun import models

    best = run / "checkpoints" / "best.pt"
    path, _ = kexport.export(best, "safetensors", tmp_path / "student.safetensors")
    state = torch.load(best, weights_only=True)["model"]
    assert {k: v.tolist() for k, v in load_file(path).items()} == {k: v.tolist() for k, v in state.items()}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    arch = json.loads(meta["kdrun.arch"])
    assert (arch["name"], arch["kwargs"], meta["kdrun.mean"]) == ("cnn", {"width": 12}, "[0.3]")
    rebuilt = models.from_arch(arch)  # from the file alone
    rebuilt.load_state_dict(load_file(path))
    images, _ = _digits_test([0.3], [0.4])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), checkpoint.load_model(best)[0](images), atol=0, rtol=0)


@pytest.mark.parametrize("pool", [nn.AdaptiveMaxPool2d(3), nn.AdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d((2, 5))])
@pytest.mark.parametrize("size", [7, 2, 8])
def test_adaptive_pooling_is_made_exportable_without_changing_its_output(pool, size):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), pool).eval()
    x = torch.randn(4, 1, size, size)
    swapped = kexport.exportable(model, (1, size, size))
    assert isinstance(swapped[1], kexport.WindowPool) and isinstance(model[1], type(pool))  # the original is kept
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), atol=1e-6, rtol=0)


def test_export_refuses_an_unknown_format(run):
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError, match="format=tflite is not an export format; use format=onnx"):
        kexport.export(run / "checkpoints" / "best.pt", "tflite")


MY_NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's model: two stages, a classifier; num_classes and in_chans come from kdrun, width from the preset."""

    def __init__(self, num_classes, in_chans, width=6):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.head(self.body(x)).mean((2, 3)))
'''


def test_a_target_student_of_the_users_own_distils_with_at_evaluates_and_exports(tmp_path, monkeypatch):
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "tinynet.py").write_text(textwrap.dedent(MY_NET))
    (tmp_path / "conf" / "student").mkdir(parents=True)
    (tmp_path / "conf" / "student" / "tiny.yaml").write_text(
        "_target_: tinynet.TinyNet\nwidth: 5\nfeature_layers: [body, head.1]\n")
    path = os.pathsep.join([str(tmp_path / "mymodels"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "kdrun", "--config-dir", str(tmp_path / "conf"), "student=tiny",
                           "method=at", "teacher.feature_layers=[layer1,layer2]", *RUN], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    run = _run_dir(tmp_path)
    assert "student features ['body', 'head.1'] [(5, 4, 4), (10, 2, 2)]" in proc.stdout  # hooks by module path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student"] == "tinynet.TinyNet"
    assert summary["student/params"] == (9 * 5 + 5) + 2 * 5 + (9 * 5 * 10 + 10) + (10 * 10 + 10)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/at", 0) > 0 for r in rows)
    arch = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["arch"]
    assert (arch["target"], arch["kwargs"], arch["num_classes"]) == ("tinynet.TinyNet", {"width": 5}, 10)

    monkeypatch.syspath_prepend(str(tmp_path / "mymodels"))  # kdrun-eval and kdrun-export, in this process
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={run / 'checkpoints' / 'best.pt'}"])
    assert evaluate_checkpoint(cfg, tmp_path / "eval")["top1"] == pytest.approx(_best_test_acc(run))
    for fmt in ("onnx", "torchscript", "safetensors"):
        _, diff = kexport.export(run / "checkpoints" / "best.pt", fmt, tmp_path / f"tiny.{fmt}")
        assert diff <= 1e-4


def test_a_target_teachers_arguments_key_its_cache():
    def key(width):
        return cache_key(make_cfg("dataset=digits", "~teacher", "+teacher._target_=tinynet.TinyNet",
                                  f"+teacher.width={width}"))

    assert key(4) != key(8)
    assert make_cfg("~teacher", "+teacher._target_=tinynet.TinyNet").teacher.name == "tinynet.TinyNet"


def test_a_target_model_gets_the_dataset_arguments_its_signature_names_and_clear_errors():
    from kdrun import models
    from kdrun.errors import KdrunError

    data = kdata.Data("digits", kdata.Splits(None, None, 7, 1, 8), [0.3], [0.4], {})

    def build(*overrides):
        return models.build(make_cfg("~student", *overrides).student, data)

    mlp = build("+student._target_=torchvision.ops.MLP", "+student.in_channels=64", "+student.hidden_channels=[16,7]")
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [16, 7]  # no num_classes: it takes none
    net = build("+student._target_=kdrun.models.small.MLP", "+student.hidden=[5]")  # num_classes, in_chans, image_size
    assert net.fc.out_features == 7 and net.hidden.fc1.in_features == 64
    with pytest.raises(KdrunError, match=r"^student._target_=nopkg.Net cannot be imported \(ModuleNotFoundError"):
        build("+student._target_=nopkg.Net")
    with pytest.raises(KdrunError, match=r"^student._target_=torchvision.ops.MLP failed with the arguments"):
        build("+student._target_=torchvision.ops.MLP", "+student.depth=3")
