"""method=consolidation (representation consolidation, Li et al. 2021): its loss against the formula written out
by hand, each head trained against its own teacher only, a run end to end on digits with two teachers that kdrun
trained, and a bad teacher entry as one sentence before anything trains."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import make_cfg
from kdrun import checkpoint, models
from kdrun import data as kdata
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate
from kdrun.methods.consolidation import Consolidation
from kdrun.run import run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = SimpleNamespace(name="toy", num_classes=10, in_chans=1, image_size=8, mean=[0.3], std=[0.4],
                       evaluation_sets=lambda: (kdata.TEST,))
MLP = {"image_size": 8, "hidden": [16]}
TASK = ["dataset.classes=[0,1,2]", "schedule.batch_size=64"]  # ~480 training images: 6 steps an epoch
FAST = ["dataset=digits", "schedule.batch_size=256", "schedule.epochs=1", "trainer.max_steps=3", "student=cnn_small"]


def _method(classes=(6, 10), weights=(0.3, 2.0), temperatures=(2.0, 4.0), ce_weight=0.5, task_head=1,
            task_classes=None):
    torch.manual_seed(0)
    student = models.create("mlp", DATA.num_classes, in_chans=1, **MLP)
    entries = [{"name": "mlp", "num_classes": n, "kwargs": MLP, "weight": w, "temperature": t}
               for n, w, t in zip(classes, weights, temperatures)]
    m = Consolidation(student, teachers=entries, task_head=task_head, ce_weight=ce_weight, task_classes=task_classes)
    m.setup(DATA)
    return m


def _kd(s, t, temperature):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean, with plain torch ops."""
    p_t = torch.softmax(t / temperature, 1)
    return temperature**2 * (p_t * (p_t.log() - torch.log_softmax(s / temperature, 1))).sum(1).mean()


def _heads_by_hand(m, x):
    """Each head's logits computed from the student's parts: the MLP's hidden layers, then each head's Linear."""
    feature = m.student.hidden(m.student.flatten(x))
    return [m.student.fc(feature) if k == m.task_head else torch.nn.functional.linear(feature, h.weight, h.bias)
            for k, h in enumerate(m.net.heads)]


def test_loss_is_each_heads_kd_against_its_own_teacher_plus_ce_on_the_task_head():
    m = _method()
    x, y = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 9, 2, 2])
    losses, metrics = m.training_step({"image": x, "label": y})
    s0, s1 = _heads_by_hand(m, x)
    t0, t1 = (teacher(x) for teacher in m.teacher.members)
    assert s0.shape == (5, 6) and s1.shape == (5, 10)
    ce = -torch.log_softmax(s1, 1)[torch.arange(5), y].mean()
    assert set(losses) == {"kd/0", "kd/1", "ce"}
    torch.testing.assert_close(losses["kd/0"], 0.3 * _kd(s0, t0, 2.0))
    torch.testing.assert_close(losses["kd/1"], 2.0 * _kd(s1, t1, 4.0))
    torch.testing.assert_close(losses["ce"], 0.5 * ce)
    torch.testing.assert_close(metrics["acc"], (s1.argmax(1) == y).float().mean())
    assert m.eval_model() is m.student and torch.equal(m.student(x), s1)  # the evaluated model: the task head


def test_each_head_gets_gradient_only_from_its_own_teachers_term():
    m = _method(ce_weight=0.0)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    losses, _ = m.training_step({"image": x, "label": torch.zeros(8, dtype=torch.long)})
    heads = list(m.net.heads)
    for k, name in enumerate(["kd/0", "kd/1"]):
        grads = torch.autograd.grad(losses[name], [h.weight for h in heads], retain_graph=True, allow_unused=True)
        assert grads[k] is not None and grads[k].abs().sum() > 0
        other = grads[1 - k]
        assert other is None or not other.any(), f"head {1 - k} got gradient from {name}"
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_a_few_steps_move_each_head_toward_its_own_teacher_not_the_others():
    m = _method(classes=(10, 10), weights=(1.0, 1.0), temperatures=(1.0, 1.0), ce_weight=0.0)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t0, t1 = (teacher(x).detach() * 3 for teacher in m.teacher.members)  # sharper targets, far apart
    m.teacher_outputs = lambda batch: torch.cat([t0, t1], 1)
    heads = [h.weight for h in m.net.heads] + [h.bias for h in m.net.heads]
    opt = torch.optim.SGD(heads, lr=0.5)  # the heads alone: the shared body is not what this test is about
    with torch.no_grad():
        before = [[_kd(s, t, 1.0) for t in (t0, t1)] for s in m.net(x)]
    for _ in range(100):
        losses, _ = m.training_step({"image": x, "label": torch.zeros(32, dtype=torch.long)})
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    with torch.no_grad():
        after = [[_kd(s, t, 1.0) for t in (t0, t1)] for s in m.net(x)]
    for k in (0, 1):
        assert after[k][k] < 0.5 * before[k][k]  # head k came close to teacher k
        assert after[k][k] < after[k][1 - k]  # and is closer to it than to the other teacher


def test_with_task_classes_the_task_head_is_the_classifiers_outputs_of_those_classes():
    """A proxy broader than the task: the task teacher's 3 classes are the run's classes 7, 2 and 5, in its order."""
    m = _method(classes=(6, 3), ce_weight=0.0, task_classes=[7, 2, 5])
    x, y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([7, 2, 0, 5, 5, 9])
    losses, metrics = m.training_step({"image": x, "label": y})
    full = m.student(x)  # ten outputs: the run's classes
    s0, _ = _heads_by_hand(m, x)
    t0, t1 = (teacher(x) for teacher in m.teacher.members)
    torch.testing.assert_close(losses["kd/1"], 2.0 * _kd(full[:, [7, 2, 5]], t1, 4.0))
    torch.testing.assert_close(losses["kd/0"], 0.3 * _kd(s0, t0, 2.0))
    task_label = torch.tensor([0, 1, 2, 2])  # of the images of classes 7, 2, 5, 5; classes 0 and 9 are not the task
    hits = (full[[0, 1, 3, 4]][:, [7, 2, 5]].argmax(1) == task_label).float().mean()
    torch.testing.assert_close(metrics["acc"], hits)
    test = m.stages(4)[0].evaluate
    assert [(e.name, e.split, e.classes, e.mask) for e in test] == [("test", "test", (7, 2, 5), (7, 2, 5))]
    with pytest.raises(KdrunError, match=r"method.task_classes=\[7, 2\] must name.* 3 distinct classes"):
        _method(classes=(6, 3), ce_weight=0.0, task_classes=[7, 2])
    with pytest.raises(KdrunError, match="method.ce_weight=0.5 with method.task_classes"):
        _method(classes=(6, 3), task_classes=[7, 2, 5])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two checkpoints of short kdrun runs on digits: a generalist of all ten digits, and a task teacher of the
    digits TASK fine-tuned from it (student.init)."""
    root = tmp_path_factory.mktemp("teachers")
    gen, task = root / "gen" / "checkpoints" / "best.pt", root / "task" / "checkpoints" / "best.pt"
    run(make_cfg(*FAST, "method=supervised", "student=cnn", "seed=1"), root / "gen", "supervised")
    run(make_cfg(*FAST, "method=supervised", "student=cnn", *TASK, f"student.init={gen}"), root / "task", "supervised")
    return gen, task


def _entries(*paths, extra=""):
    return "method.teachers=[" + ", ".join(f"{{checkpoint: '{p}'{extra}}}" for p in paths) + "]"


def test_consolidation_runs_end_to_end_on_digits_with_two_teachers_and_writes_the_transfer_results(teachers, tmp_path):
    gen, task = teachers
    cfg = make_cfg(*FAST, *TASK, "method=consolidation", _entries(gen, task, extra=", weight: 0.5"),
                   "method.ce_weight=0.1", "transfer=digits_halves", "transfer.epochs=1")
    summary = run(cfg, tmp_path, "consolidation")
    assert summary["steps"] == 3 and summary["teacher"] == "cnn+cnn" and summary["student"] == "cnn"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/kd/0", "train/kd/1", "train/ce"} <= {k for r in rows for k in r}
    model, ckpt = checkpoint.load_model(tmp_path / "checkpoints" / "best.pt")  # a plain classifier of the task
    assert type(model).__name__ == "SmallCNN" and ckpt["arch"]["num_classes"] == 3
    assert 0 <= summary["transfer/low/acc"] <= 1 and 0 <= summary["transfer/high/acc"] <= 1
    probe = json.loads((tmp_path / "transfer" / "low" / "linear_probe" / "result.json").read_text())
    assert probe["layer"] == "fc:in"  # the shared feature the heads read


def test_a_proxy_of_more_classes_than_the_task_scores_the_task_head_on_the_tasks_test_images(teachers, tmp_path):
    """The proxy is every digit, labelled in another order: the task teacher's digits 0, 1 and 2 are the run's
    classes 1, 0 and 3. The summary's test accuracy is best.pt's on those classes' test images alone."""
    gen, task = teachers
    proxy = ["dataset.classes=[1,0,3,2,4,5,6,7,8,9]", "dataset.val_size=null"]  # task 0, 1, 2 = the run's 1, 0, 3
    cfg = make_cfg(*FAST, *proxy, "method=consolidation", _entries(gen, task), "method.task_classes=[1,0,3]")
    summary = run(cfg, tmp_path, "consolidation")
    model, ckpt = checkpoint.load_model(tmp_path / "checkpoints" / "best.pt")
    assert ckpt["arch"]["num_classes"] == 10  # the proxy's classifier; the task is three of its outputs
    loaders = kdata.Loaders(kdata.build(cfg.dataset), kdata.BatchSpec(), 256, 256, "cpu", seed=0)
    task_test = loaders.evaluation(kdata.EvalSet("test", classes=(1, 0, 3)))
    assert summary["test/acc"] == pytest.approx(evaluate(model, task_test, classes=(1, 0, 3))["acc"])
    whole_test = evaluate(model, loaders.evaluation(kdata.TEST), classes=(1, 0, 3))["acc"]  # other digits: wrong
    assert summary["test/acc"] > 0 and summary["test/acc"] != pytest.approx(whole_test)  # the task's images alone


@pytest.mark.parametrize("entries, extra, message", [
    ("missing", [], r"method.teachers\[1\].checkpoint=.*nope.pt does not exist"),
    ("state_dict", [], r"method.teachers\[1\].checkpoint=.* records no architecture"),
    ("both", ["method.task_head=2"], r"method.task_head=2 but there are 2 teachers"),
    ("both", ["+weight"], r"method.teachers\[0\].weight=-1 is not allowed; weight takes a number >= 0"),
    ("none", [], "method=consolidation has no teachers"),
    ("both", ["method.task_head=0"], r"method.teachers\[0\] \(the task head\) predicts 10 classes but digits has 3"),
])
def test_a_bad_teacher_entry_is_one_sentence_before_anything_trains(teachers, tmp_path, entries, extra, message):
    gen, task = teachers
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(task, weights_only=True)["model"], plain)
    paths = {"missing": [gen, tmp_path / "nope.pt"], "state_dict": [gen, plain], "both": [gen, task], "none": []}
    weight = ", weight: -1" if extra == ["+weight"] else ""
    extra = [] if weight else extra
    cfg = make_cfg(*FAST, *TASK, "method=consolidation", _entries(*paths[entries], extra=weight), *extra)
    with pytest.raises(KdrunError, match=message) as err:
        run(cfg, tmp_path / "run", "consolidation")
    assert "\n" not in str(err.value) and str(err.value).count("; ") <= 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_imagenet_preset_names_its_missing_task_teacher_in_one_sentence(tmp_path):
    cfg = make_cfg("experiment=consolidation/imagenet_resnet50", f"dataset.root={tmp_path}",
                   "transfer.tasks={t: {dataset: digits}}")
    assert cfg.method.teachers[0].name == "resnet50" and cfg.method.teachers[0].num_classes == 1000
    with pytest.raises(KdrunError, match=r"^method.teachers.1.checkpoint has no value .*: "
                                         r"method.teachers.1.checkpoint=VALUE$"):
        run(cfg, tmp_path / "run", "consolidation")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # ~1 min: three ResNet-50s
def test_the_imagenet_preset_runs_end_to_end_with_resnet50s(tmp_path):
    """experiment=consolidation/imagenet_resnet50 on a tiny image folder at 32 px, the ImageNet weights left out
    (pretrained=false: no internet here): the paper's setting composes, trains and probes."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "task" / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "task" / split / f"c{c}" / f"{i}.png")
    small = [f"dataset.root={tmp_path / 'task'}", "dataset.image_size=32", "schedule.batch_size=4",
             "trainer.max_steps=1", "schedule.epochs=1", "trainer.precision=32", "trainer.num_workers=0"]
    run(make_cfg("method=supervised", "dataset=imagenet", "student=resnet50", "dataset.val_size=null", *small),
        tmp_path / "teacher", "supervised")  # the task teacher, as the preset's header trains it
    task_teacher = tmp_path / "teacher" / "checkpoints" / "best.pt"
    preset = ["experiment=consolidation/imagenet_resnet50", "student.pretrained=false",
              "method.teachers.0.pretrained=false", *small, "transfer.epochs=1", "transfer.batch_size=4",
              f"transfer.tasks={{t: {{dataset: imagenet, root: '{tmp_path / 'task'}', image_size: 32}}}}"]
    summary = run(make_cfg(*preset, f"method.teachers.1.checkpoint={task_teacher}"), tmp_path / "run", "consolidation")
    assert summary["student"] == "resnet50" and summary["steps"] == 1
    assert 0 <= summary["transfer/t/acc"] <= 1
    model, ckpt = checkpoint.load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    assert ckpt["arch"]["num_classes"] == 2 and model.fc.in_features == 2048
