"""Transfer learning: a student (or teacher) started from a checkpoint with a new head, frozen module prefixes whose
weights and BatchNorm statistics never move, learning-rate groups, class subsets, and the transfer evaluation
(`transfer=`, `kdrun-transfer`)."""

import json

import pytest
import torch
from conftest import make_cfg
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from kdrun import data as kdata
from kdrun import models
from kdrun.engine import Engine
from kdrun.errors import KdrunError
from kdrun.methods.supervised import Supervised
from kdrun.run import run
from kdrun.teacher import cache_key
from kdrun.transfer import feature_layer

FAST = ["dataset=digits", "method=supervised", "student=cnn_small", "schedule.batch_size=64", "schedule.epochs=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short supervised run on digits: its run dir (checkpoints/best.pt: the student to start from)."""
    run_dir = tmp_path_factory.mktemp("source")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(make_cfg(*FAST, "schedule.epochs=2"), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_frozen_parameters_and_batchnorm_statistics_do_not_move_while_the_rest_trains(tmp_path, one_thread):
    start = models.create("cnn", 10, in_chans=1, width=12)
    start.layer2[1].running_mean.fill_(0.5)  # statistics a BatchNorm in train mode would pull towards the data's
    torch.save(start.state_dict(), tmp_path / "start.pt")
    summary = run(make_cfg(*FAST, "trainer.max_steps=6", f"student.init={tmp_path / 'start.pt'}",
                           "student.freeze=[layer1,layer2.1]"), tmp_path / "run")
    before, after = start.state_dict(), weights(tmp_path / "run" / "checkpoints" / "last.pt")
    frozen = [k for k in before if k.startswith(("layer1.", "layer2.1."))]
    assert {"layer1.1.running_mean", "layer2.1.running_var", "layer2.1.num_batches_tracked"} <= set(frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    for moved in ("layer2.0.weight", "layer3.1.running_mean", "layer3.1.weight", "fc.weight"):
        assert not torch.equal(before[moved], after[moved]), moved
    frozen_params = sum(p.numel() for n, p in start.named_parameters() if n.startswith(("layer1.", "layer2.1.")))
    assert summary["train/params_trained"] == summary["student/params"] - frozen_params


def test_a_linear_probe_from_a_runs_best_pt_trains_only_the_head_and_a_fine_tune_all(trained, tmp_path, one_thread):
    best = trained / "checkpoints" / "best.pt"
    probe = run(make_cfg(*FAST, f"student.init={best}", "student.freeze=[backbone]", "dataset.classes=[0,1,2]"),
                tmp_path / "probe")
    fc = weights(best)["fc.weight"]
    assert probe["train/params_trained"] == fc.shape[1] * 3 + 3  # the new 3-class head alone
    after = weights(tmp_path / "probe" / "checkpoints" / "last.pt")
    assert all(torch.equal(v, after[k]) for k, v in weights(best).items() if not k.startswith("fc."))
    finetune = run(make_cfg(*FAST, f"student.init={best}", "dataset.classes=[0,1,2]"), tmp_path / "finetune")
    assert finetune["train/params_trained"] == finetune["student/params"] == probe["student/params"]


def test_init_with_another_class_count_replaces_only_the_head(trained):
    best = trained / "checkpoints" / "best.pt"
    cfg = make_cfg(*FAST, f"student.init={best}", "dataset.classes=[4,5,6,7]")
    model = models.build(cfg.student, kdata.build(cfg.dataset))
    saved, mine = weights(best), model.state_dict()
    assert set(saved) == set(mine) and mine["fc.weight"].shape[0] == 4 and saved["fc.weight"].shape[0] == 10
    assert all(torch.equal(saved[k], mine[k]) for k in saved if not k.startswith("fc."))
    assert models.classifier(model) == ("fc", model.fc)
    same = models.build(make_cfg(*FAST, f"student.init={best}").student, kdata.build(make_cfg(*FAST).dataset))
    assert all(torch.equal(saved[k], v) for k, v in same.state_dict().items())  # same classes: the head too


def test_a_bad_init_file_a_wrong_shape_or_an_unknown_freeze_prefix_is_one_sentence(trained, tmp_path):
    data = kdata.build(make_cfg(*FAST).dataset)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases = [
        ([f"student.init={tmp_path / 'none.pt'}"], r"student.init=.*none.pt: checkpoint .* does not exist"),
        ([f"student.init={tmp_path / 'junk.pt'}"], r"student.init=.*junk.pt: cannot read checkpoint"),
        ([f"student.init={trained / 'checkpoints' / 'best.pt'}", "student.kwargs.width=8"],
         (r"student.init=.*best.pt does not fit this SmallCNN \(layer1.0.weight \(12, 1, 3, 3\) in the file vs "
          r"\(8, 1, 3, 3\) here.*only the classifier may differ")),
        (["student.freeze=[layer9]"], r"student.freeze names 'layer9', .* top-level modules layer1, layer2, layer3, fc"),
    ]
    for overrides, message in cases:
        with pytest.raises(KdrunError, match=message) as error:
            models.build(make_cfg(*FAST, *overrides).student, data)
        assert "\n" not in str(error.value)


def test_lr_groups_and_layer_decay_give_the_multipliers_computed_by_hand():
    cfg = make_cfg(*FAST, "schedule.lr_groups={student: 0.1, student.fc: 2.0}", "schedule.layer_decay=0.5")
    data = kdata.build(cfg.dataset)
    student = models.build(cfg.student, data)
    method = Supervised(student)
    engine = Engine(method, kdata.Loaders(data, method.batch_spec, 64, 100, "cpu", seed=0), cfg.schedule, cfg.trainer)
    optimizer, scheduler = engine.make_optimizer(list(method.parameters()), epochs=1, steps_per_epoch=10)
    base = cfg.schedule.optimizer.lr
    # the student's top-level modules with parameters, by depth: layer1, layer2, layer3, then the classifier fc;
    # lr_groups: 0.1 for the student, 2.0 for its fc (the longer prefix); layer decay 0.5 per step from fc
    expected = {"fc": base * 2.0, "layer3": base * 0.1 * 0.5, "layer2": base * 0.1 * 0.25, "layer1": base * 0.1 * 0.125}
    got = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            module = next(n for n, q in student.named_parameters() if q is p).split(".")[0]
            got.setdefault(module, set()).add(group["lr"])
    assert {m: lrs.pop() for m, lrs in got.items() if len(lrs) == 1} == pytest.approx(expected)
    assert scheduler.base_lrs == [g["initial_lr"] for g in optimizer.param_groups]  # LambdaLR scales each group
    cfg = make_cfg(*FAST, "schedule.lr_groups={student.fc2: 0.1}")
    engine = Engine(method, engine.loaders, cfg.schedule, cfg.trainer)
    with pytest.raises(KdrunError, match=r"schedule.lr_groups names 'student.fc2', which no parameter .* student.fc"):
        engine.make_optimizer(list(method.parameters()), epochs=1, steps_per_epoch=10)


def test_layer_decay_follows_timms_group_matcher_where_the_model_has_one():
    model = models.create("timm:test_resnet", 3, in_chans=1)
    depth = models.depth_groups(model)
    assert depth["conv1.0.weight"] == depth["bn1.weight"] == 0  # timm's stem: one group
    assert depth["layer1.0.conv1.weight"] < depth["layer4.0.conv1.weight"] < depth["fc.weight"] == max(depth.values())


def test_dataset_classes_relabels_in_the_order_given_and_enters_the_teacher_cache_key():
    whole = kdata.build(make_cfg("dataset=digits", "dataset.val_size=null").dataset)
    sub = kdata.build(make_cfg("dataset=digits", "dataset.val_size=null", "dataset.classes=[7,2]").dataset)
    assert sub.num_classes == 2
    for split in ("train", "test"):
        mine, theirs = getattr(sub.splits, split), getattr(whole.splits, split)
        keep = (theirs.labels == 7) | (theirs.labels == 2)
        assert torch.equal(mine.images, theirs.images[keep])
        assert torch.equal(mine.labels, (theirs.labels[keep] == 2).long())  # 7 -> 0, 2 -> 1
    held = kdata.build(make_cfg("dataset=digits", "dataset.classes=[7,2]").dataset)
    assert len(held.val) + len(held.splits.train) == len(sub.splits.train) and set(held.val.labels.tolist()) == {0, 1}
    with pytest.raises(KdrunError, match=r"dataset.classes=\[3, 3\]; give distinct class numbers between 0 and 9"):
        kdata.build(make_cfg("dataset=digits", "dataset.classes=[3,3]").dataset)
    key = cache_key(make_cfg("dataset=digits"))
    assert cache_key(make_cfg("dataset=digits", "dataset.classes=[7,2]")) not in (
        key, cache_key(make_cfg("dataset=digits", "dataset.classes=[2,7]")))
    unset = make_cfg("dataset=digits")
    OmegaConf.set_struct(unset, False)
    del unset.dataset["classes"], unset.schedule["lr_groups"], unset.schedule["layer_decay"]
    assert cache_key(unset) == key  # an unset field keeps the key the teacher had before it existed


def test_dataset_classes_keeps_and_relabels_the_images_of_an_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(3):
            (tmp_path / split / f"class_{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), color=60 * c + i).save(tmp_path / split / f"class_{c}" / f"{i}.png")
    data = kdata.build(make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.val_size=null",
                                "dataset.classes=[2,0]").dataset)
    assert data.num_classes == 2 and data.splits.test.classes == ["class_2", "class_0"]
    batch = next(iter(kdata.Loaders(data, kdata.BatchSpec(), 8, 8, "cpu", seed=0).evaluation()))
    pixel = ((batch["image"][:, 0, 0, 0] * 0.5 + 0.5) * 255).round().long()
    assert sorted(zip(batch["label"].tolist(), (pixel // 60).tolist())) == [(0, 2)] * 4 + [(1, 0)] * 4


def test_teacher_init_enters_the_cache_key_by_its_weights(tmp_path):
    model = models.create("cnn", 10, in_chans=1, width=4)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save({"model": model.state_dict(), "arch": {}}, tmp_path / "b.pt")  # the same weights, as a checkpoint
    torch.save(models.create("cnn", 10, in_chans=1, width=4).state_dict(), tmp_path / "c.pt")
    keys = [cache_key(make_cfg("dataset=digits", *([f"teacher.init={tmp_path / f}"] if f else [])))
            for f in (None, "a.pt", "b.pt", "c.pt")]
    assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3


def test_the_feature_is_the_declared_one_else_the_input_of_the_last_linear_called():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
            self.heads = nn.ModuleList([nn.Linear(16, 10), nn.Linear(16, 3)])

        def forward(self, x):
            z = self.backbone(x)
            return [h(z) for h in self.heads]

    model = TwoHeads()
    assert feature_layer(model, (1, 8, 8)) == "heads.1:in"  # the shared feature both heads read
    model.feature_layer = "backbone"
    assert feature_layer(model, (1, 8, 8)) == "backbone"
    with pytest.raises(KdrunError, match="has no module 'neck'"):
        feature_layer(model, (1, 8, 8), "neck")


def test_the_transfer_evaluation_reports_each_task_and_kdrun_transfer_gives_the_same(trained, tmp_path, one_thread):
    task = "~transfer.tasks.high"  # digits_halves's task `low` alone: the digits 0-4
    summary = run(make_cfg(*FAST, "trainer.max_steps=8", "transfer=digits_halves", task, "transfer.epochs=3",
                           "transfer.protocols=[linear_probe,finetune]"), tmp_path / "run")
    assert summary["transfer/low/acc"] > 0.5 and summary["transfer/low/finetune/acc"] > 0.5  # chance: 1/5
    assert {"transfer/low/val_acc", "transfer/low/finetune/val_acc"} <= set(summary)
    assert not any(k.startswith("transfer/high") for k in summary)
    probe = tmp_path / "run" / "transfer" / "low" / "linear_probe"
    result = json.loads((probe / "result.json").read_text())
    assert result["test/acc"] == summary["transfer/low/acc"] and result["layer"] == "fc:in"
    assert result["params_trained"] == weights(trained / "checkpoints" / "best.pt")["fc.weight"].shape[1] * 5 + 5
    student = weights(tmp_path / "run" / "checkpoints" / "best.pt")
    encoder = {k[len("encoder."):]: v for k, v in weights(probe / "checkpoints" / "last.pt").items()
               if k.startswith("encoder.")}
    assert encoder.keys() == student.keys() and all(torch.equal(student[k], v) for k, v in encoder.items())

    from kdrun.tools.transfer import transfer_checkpoint

    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = compose("transfer_eval", overrides=[f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.pt'}",
                                                  "transfer=digits_halves", task, "transfer.epochs=3",
                                                  "transfer.protocols=[linear_probe,finetune]", "trainer.max_steps=8"])
    report = transfer_checkpoint(cfg, tmp_path / "tool")
    assert {k: v for k, v in report.items() if k.startswith("transfer/")} == {
        k: v for k, v in summary.items() if k.startswith("transfer/")}
    assert json.loads((tmp_path / "tool" / "transfer.json").read_text()) == report


def test_a_bad_transfer_task_stops_the_run_before_training(tmp_path):
    cases = [("+transfer.tasks.x={dataset: digitz}", r"transfer.tasks.x.dataset=digitz is not a dataset preset"),
             ("+transfer.tasks.x={dataset: digits, classes: [12]}", r"transfer task 'x': dataset.classes=\[12\]"),
             ("+transfer.tasks.x={dataset: digits, clases: [1]}", r"transfer.tasks.x.clases is not a dataset field")]
    for task, message in cases:
        with pytest.raises(KdrunError, match=message):
            run(make_cfg(*FAST, "transfer=digits_halves", task), tmp_path / "run")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_task_dataset_preset_follows_its_defaults_list(tmp_path):
    """dataset: imagenet is image_folder's reader with ImageNet's size and statistics (conf/dataset/imagenet.yaml
    names image_folder in its defaults)."""
    from kdrun.transfer import task_dataset

    dataset = task_dataset("t", OmegaConf.create({"dataset": "imagenet", "root": str(tmp_path)}), str(tmp_path))
    assert dataset.source.root == str(tmp_path) and dataset.image_size == 224
    assert list(dataset.mean) == [0.485, 0.456, 0.406] and dataset.name == "imagenet"
