"""LwF (Li & Hoiem) and LwM (Dhar et al.): their losses on fixed tensors, the warm-up that moves only the new head,
the frozen previous model, Grad-CAM against an independent computation, the attention term's gradient (a detached
one is the known mistake), resume, and split runs end to end on digits."""

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import kdrun, make_cfg
from kdrun import data as kdata, scenario as kscenario
from kdrun.data.sources import digits
from kdrun.engine import Engine, Interrupted
from kdrun.errors import KdrunError
from kdrun.losses.continual import attention_distillation_loss, grad_cam, lwf_loss
from kdrun.methods.base import Stage
from kdrun.methods.lwf import LwF
from kdrun.methods.lwm import LwM
from kdrun.models.small import SmallCNN
from kdrun.run import run


def _shape(in_chans, image_size, num_classes):
    """What `setup` reads of a dataset, for images that are no dataset's."""
    return SimpleNamespace(in_chans=in_chans, image_size=image_size, num_classes=num_classes,
                           splits=SimpleNamespace(train=()))


DIGITS = _shape(1, 8, 10)


def _data(crop_padding=1):
    return kdata.Data("digits", digits(), [0.3], [0.4], {"crop_padding": crop_padding})


def _stage(experience, classes, seen, phase="train", first=True):
    info = {"experience": experience, "classes": classes, "seen": seen, "phase": phase, "first": first}
    return Stage(phase, 1, data=kdata.Selection(classes=classes), info=info)


def _fit(method, run_dir, stages, schedule="sgd_cosine", resume=None, crop_padding=1):
    cfg = make_cfg("dataset=digits", f"schedule={schedule}", "trainer.checkpoint_every_steps=3")
    loaders = kdata.Loaders(_data(crop_padding), kdata.BatchSpec(), 32, 512, "cpu", seed=0)
    return Engine(method, loaders, OmegaConf.merge(cfg.schedule, {"epochs": 2}), cfg.trainer, run_dir).fit(resume, stages)


def _split(method, epochs=2, experiences=5):
    split = kscenario.Split(experiences=experiences)
    split.setup(_data())
    return split.stages(method, epochs)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(10, in_chans=1, width=4)


# ---- LwF -----------------------------------------------------------------------------------------------------------

def test_lwf_loss_is_the_kl_of_the_softened_old_outputs_without_a_t_squared_factor():
    new = torch.tensor([[0.0, 0.0]])
    previous = torch.tensor([[2 * math.log(3.0), 0.0]])  # / T = 2: softmax [3/4, 1/4]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert lwf_loss(new, previous, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert lwf_loss(previous, previous, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_lwf_trains_the_active_head_and_distils_the_old_classes_logits():
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    with torch.no_grad():
        student[1].weight.copy_(torch.eye(4))
        student[1].bias.zero_()
    method = LwF(student, temperature=2.0, lambda_o=0.5)
    method.setup(_shape(1, 2, 4))
    method.on_stage_start(_stage(1, (2, 3), (0, 1, 2, 3)), None)
    with torch.no_grad():
        method.previous[1].weight.copy_(2 * torch.eye(4))  # the previous model's logits: twice the student's
    z = [1.0, -1.0, 0.5, 2.0]
    losses, _ = method.training_step({"image": torch.tensor([z]).view(1, 1, 2, 2), "label": torch.tensor([3])})
    ce = -math.log(math.exp(2.0) / (math.exp(0.5) + math.exp(2.0)))  # over classes 2 and 3 only
    p = [math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1])), math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1]))]
    q = [math.exp(z[0] / 2) / (math.exp(z[0] / 2) + math.exp(z[1] / 2)),
         math.exp(z[1] / 2) / (math.exp(z[0] / 2) + math.exp(z[1] / 2))]
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["lwf"].item() == pytest.approx(0.5 * sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)


class Watched(LwF):
    """LwF that keeps the student's and the previous model's state at each stage's start and end, and checks at
    every step that the previous model is frozen and in eval mode."""

    def __init__(self, student, **kw):
        super().__init__(student, **kw)
        self.seen = {}

    def _snap(self, model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    def on_stage_start(self, stage, loop):
        super().on_stage_start(stage, loop)
        self.seen[stage.name, "start"] = self._snap(self.student), self._snap(self.previous)

    def on_stage_end(self, stage, loop):
        self.seen[stage.name, "end"] = self._snap(self.student), self._snap(self.previous)

    def training_step(self, batch):
        assert not self.previous.training and not any(p.requires_grad for p in self.previous.parameters())
        return super().training_step(batch)


def test_the_warm_up_moves_only_the_new_classes_rows_of_the_classifier(tmp_path):
    method = Watched(_cnn(), warmup_epochs=1)
    method.setup(DIGITS)
    stages = _split(method)[:2]  # exp0, exp1/warmup; SGD with momentum and weight decay
    assert [s.name for s in stages] == ["exp0", "exp1/warmup"]
    _fit(method, tmp_path, stages)
    (before, _), (after, _) = method.seen["exp1/warmup", "start"], method.seen["exp1/warmup", "end"]
    for key, value in before.items():
        if key in ("fc.weight", "fc.bias"):
            assert torch.equal(value[[0, 1, 4, 5, 6, 7, 8, 9]], after[key][[0, 1, 4, 5, 6, 7, 8, 9]]), key
            assert not torch.equal(value[[2, 3]], after[key][[2, 3]]), key  # the new head trained
        else:
            assert torch.equal(value, after[key]), key  # conv weights, BatchNorm statistics: bit-identical


def test_the_previous_model_is_the_last_experiences_student_and_never_changes(tmp_path):
    method = Watched(_cnn(), warmup_epochs=1)
    method.setup(DIGITS)
    _fit(method, tmp_path, _split(method, experiences=3)[:3])  # exp0, exp1/warmup, exp1/train
    end_of_0 = method.seen["exp0", "end"][0]
    for when in ("start", "end"):
        for stage in ("exp1/warmup", "exp1/train"):
            previous = method.seen[stage, when][1]
            assert all(torch.equal(end_of_0[k], v) for k, v in previous.items()), (stage, when)
    assert not torch.equal(method.seen["exp1/train", "end"][0]["layer1.0.weight"], end_of_0["layer1.0.weight"])
    method.train()
    assert method.student.training and not method.previous.training


class Compared(LwF):
    """LwF that checks at every joint step the previous outputs it uses against the previous model run on the batch."""

    def training_step(self, batch):
        if self.experience and self.phase == "train":
            self.tabulated = self.table is not None
            assert torch.allclose(self.previous_outputs(batch), self.previous(batch["image"]), atol=1e-5)
        return super().training_step(batch)


@pytest.mark.parametrize("crop_padding", [0, 1])
def test_the_previous_outputs_are_computed_once_per_experience_where_the_images_are_plain(tmp_path, crop_padding):
    method = Compared(_cnn(), warmup_epochs=0)
    method.setup(_data(crop_padding))
    _fit(method, tmp_path, _split(method, epochs=1, experiences=3)[:2], crop_padding=crop_padding)
    assert method.tabulated == (crop_padding == 0)  # augmented images: the previous model runs per step
    if crop_padding == 0:
        rows, logits = method.table
        assert (rows >= 0).sum() == len(logits) and len(logits) == 435  # the training images of classes 4, 5, 6


def test_lwf_without_a_scenario_or_with_cumulative_data_is_refused():
    method = LwF(_cnn())
    method.setup(DIGITS)
    with pytest.raises(KdrunError, match="method=lwf learns experiences in sequence; run it with scenario=split"):
        method.on_stage_start(Stage("train", 1), None)
    stage = _stage(1, (2, 3), (0, 1, 2, 3))
    stage.data = kdata.Selection(classes=(0, 1, 2, 3))
    with pytest.raises(KdrunError, match="scenario.cumulative=false"):
        method.on_stage_start(stage, None)


def stopping(cls, stop_at=None, **kw):
    """`cls` that sends itself SIGTERM at step `stop_at`, as a preemption."""

    class Stops(cls):
        def training_step(self, batch):
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch)

    return Stops(_cnn(), warmup_epochs=1, **kw)


# 3 experiences: exp0 2 epochs of 18 steps; exp1 a warm-up epoch of 13 steps, then 2 epochs: stopped in the
# warm-up, or in the joint stage's second epoch (its previous outputs computed per step, or once: no augmentation)
@pytest.mark.parametrize("cls, stop_at, crop_padding", [(LwF, 36 + 5, 1), (LwF, 36 + 13 + 13 + 5, 1),
                                                        (LwF, 36 + 13 + 13 + 5, 0), (LwM, 36 + 13 + 13 + 5, 1)])
def test_a_run_resumes_exactly_in_the_warm_up_and_in_the_joint_stage(tmp_path, cls, stop_at, crop_padding):
    def fit(method, run_dir, resume=None):
        method.setup(_data(crop_padding))
        return _fit(method, run_dir, _split(method, experiences=3), resume=resume, crop_padding=crop_padding)

    whole = fit(stopping(cls), tmp_path / "whole")
    with pytest.raises(Interrupted):
        fit(stopping(cls, stop_at), tmp_path / "stopped")
    resumed = stopping(cls)
    again = fit(resumed, tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert again["stage_results"] == whole["stage_results"] and len(whole["stage_results"]) == 5
    final = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert all(torch.equal(final[k], v) for k, v in resumed.state_dict().items())


# ---- LwM -----------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """conv -> ReLU (`act`, the hooked map) -> global average pool -> fc: d y_c / d A_k,ij = W_ck / (H W)."""

    def __init__(self, head=None):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.head = head or nn.Identity()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.head(self.act(self.conv(x)).mean((2, 3))))


def test_grad_cam_equals_the_map_computed_by_hand():
    torch.manual_seed(0)
    net, x = Tiny(), torch.randn(2, 1, 5, 5)
    a = net.act(net.conv(x))
    y = net.fc(a.mean((2, 3)))
    c = torch.tensor([2, 0])
    cam = grad_cam(a, y.gather(1, c[:, None]).squeeze(1), create_graph=False)
    assert 0 < (cam > 0).sum() < cam.numel()  # the ReLU cuts part of each map
    alpha = net.fc.weight[c] / 25  # the spatial mean of the gradient, written out
    expected = F.relu((alpha[:, :, None, None] * a).sum(1))
    assert torch.allclose(cam, expected.detach(), atol=1e-6) and cam.shape == (2, 5, 5)
    q = cam.flatten(1) / cam.flatten(1).norm(dim=1, keepdim=True)
    r = torch.rand_like(q)
    assert attention_distillation_loss(cam, r).item() == pytest.approx(
        (q - r / r.norm(dim=1, keepdim=True)).abs().sum(1).mean().item(), rel=1e-6)


def test_the_attention_term_differentiates_through_the_grad_cam_weights():
    """With a non-linear head the Grad-CAM weights depend on the conv weights: the gradient of L_AD (autograd,
    double backward) must equal central differences, which a detached gradient would not."""
    torch.manual_seed(0)
    net = Tiny(nn.Sequential(nn.Linear(3, 3), nn.Tanh())).double()
    x, c = torch.randn(2, 1, 5, 5, dtype=torch.float64), torch.tensor([0, 2])
    target = torch.rand(2, 5, 5, dtype=torch.float64)

    def loss(create_graph=True):
        a = net.act(net.conv(x))
        y = net.fc(net.head(a.mean((2, 3))))
        return attention_distillation_loss(target, grad_cam(a, y.gather(1, c[:, None]).squeeze(1), create_graph))

    (grad,) = torch.autograd.grad(loss(), net.conv.weight)
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(grad.numel()):
            w = net.conv.weight.view(-1)
            w[i] += 1e-6
            with torch.enable_grad():
                up = loss().item()
            w[i] -= 2e-6
            with torch.enable_grad():
                down = loss().item()
            w[i] += 1e-6
            numeric.view(-1)[i] = (up - down) / 2e-6
    assert torch.allclose(grad, numeric, atol=1e-6)
    (detached,) = torch.autograd.grad(loss(create_graph=False), net.conv.weight)
    assert not torch.allclose(detached, numeric, atol=1e-4)  # the test tells the two apart


def _lwm(student, **kw):
    method = LwM(student, layer="act", **kw)
    method.setup(_shape(1, 5, 4))
    method.on_stage_start(_stage(1, (2, 3), (0, 1, 2, 3)), None)
    return method


def test_lwm_maps_the_previous_models_top_old_class_and_its_attention_term_has_a_gradient():
    torch.manual_seed(0)
    method = _lwm(Tiny())
    with torch.no_grad():
        for p in method.previous.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a previous model other than the student
    x = torch.randn(3, 1, 5, 5)
    previous, previous_map, top = method.previous_attention(x)
    prev = method.previous
    a = prev.act(prev.conv(x))
    assert torch.equal(top, previous[:, :2].argmax(1))  # among the old classes 0, 1 only
    expected = F.relu(((prev.fc.weight[top] / 25)[:, :, None, None] * a).sum(1))
    assert torch.allclose(previous_map, expected, atol=1e-6) and not previous_map.requires_grad
    losses, _ = method.training_step({"image": x, "label": torch.tensor([2, 3, 2])})
    assert set(losses) == {"ce", "lwf", "attention"} and losses["attention"] > 0
    conv, fc = torch.autograd.grad(losses["attention"], [method.student.conv.weight, method.student.fc.weight])
    assert conv.abs().sum() > 0
    assert fc.abs().sum() > 0  # only through the Grad-CAM weights: the double backward


def test_lwm_refuses_a_student_without_conv_maps():
    from kdrun.models.small import MLP

    with pytest.raises(KdrunError, match="use a convolutional student, e.g. student=cnn_small"):
        LwM(MLP(10, in_chans=1, image_size=8)).setup(DIGITS)


def test_lwm_reads_the_students_last_default_feature_layer():
    method = LwM(_cnn())
    method.setup(DIGITS)
    assert method.s_cam.specs == ["layer3"] and method.p_cam.model is method.previous


# ---- end to end ----------------------------------------------------------------------------------------------------

def _check_run(run_dir):
    matrices = json.loads((run_dir / "accuracy_matrix.json").read_text())
    assert [len(matrices[p]) for p in ("class_il", "task_il")] == [5, 5] and len(matrices["task_il"][0]) == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cl/task_il/acc"] == pytest.approx(sum(matrices["task_il"][4]) / 5)
    assert {"cl/class_il/acc", "cl/class_il/bwt", "cl/task_il/bwt", "cl/class_il/forgetting"} <= set(summary)
    return summary


def test_kdrun_split_lwm_runs_end_to_end_on_digits(tmp_path):
    kdrun("scenario=split", "dataset=digits", "method=lwm", "student=cnn_small", "logger=none", "schedule.epochs=2",
          f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    summary = _check_run(tmp_path)
    assert summary["train/samples_per_s"] > 0


def test_kdrun_split_lwf_keeps_task_incremental_accuracy_at_least_as_fine_tuning_does(tmp_path):
    kdrun("scenario=split", "dataset=digits", "method=lwf", "student=mlp", "logger=none", "schedule.epochs=2",
          f"hydra.run.dir={tmp_path / 'lwf'}", cwd=tmp_path)
    lwf = _check_run(tmp_path / "lwf")
    flags = ("scenario=split", "dataset=digits", "student=mlp", "schedule.epochs=2")
    fine_tuning = run(make_cfg(*flags, "method=supervised"), tmp_path / "ft", "supervised")
    assert lwf["cl/task_il/acc"] >= fine_tuning["cl/task_il/acc"]
    assert lwf["cl/task_il/forgetting"] < fine_tuning["cl/task_il/forgetting"]
