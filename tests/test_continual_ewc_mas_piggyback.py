"""EWC, MAS and Piggyback (issue 15): per-sample importances against one-sample-at-a-time autograd and closed forms,
the penalties' values and gradients, online EWC's running Fisher, Piggyback's frozen backbone, straight-through
masks and assembled logits, resume, and each method end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import kdrun, make_cfg, preempted
from kdrun import data as kdata, scenario as kscenario
from kdrun.data.sources import digits
from kdrun.engine import Engine, Interrupted
from kdrun.losses.importance import fisher_diagonal, mas_importance
from kdrun.methods.base import Stage
from kdrun.methods.ewc import EWC
from kdrun.methods.mas import MAS
from kdrun.methods.piggyback import Binarize, Piggyback
from kdrun.models.small import mlp

X = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0], [-1.5, 0.2, 2.0]])
Y = torch.tensor([0, 2, 1])
W = torch.tensor([[0.2, -0.1, 0.4], [-0.3, 0.5, 0.1], [0.05, 0.2, -0.6]])


def _linear():
    """logits = W x (no bias): d log p(c|x) / dW = (e_c - p) x^T, the closed form the tests use."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(W)
    return model


def _batches(x=X, y=Y, size=2):
    return [{"image": x[i:i + size], "label": y[i:i + size]} for i in range(0, len(x), size)]


def _grad_log_p(x, c, weight=W):
    p = F.softmax(weight @ x, 0)
    return torch.outer(torch.eye(3)[c] - p, x), p


def test_the_fisher_is_the_mean_of_per_sample_squared_gradients_not_a_squared_batch_gradient():
    model = _linear()
    (fisher,) = fisher_diagonal(model, ["weight"], _batches(), "empirical")
    one_at_a_time = torch.zeros(3, 3)
    for x, y in zip(X, Y):  # autograd, one sample at a time
        model.zero_grad()
        F.log_softmax(model(x[None]), 1)[0, y].backward()
        one_at_a_time += model.weight.grad ** 2 / 3
    assert torch.allclose(fisher, one_at_a_time, atol=1e-6)
    model.zero_grad()
    F.cross_entropy(model(X), Y).backward()  # the known mistake: the square of a mini-batch gradient
    assert not torch.allclose(fisher, model.weight.grad ** 2, atol=1e-3)
    assert fisher.sum() > 2 * (model.weight.grad ** 2).sum()


def test_the_exact_sampled_and_empirical_fishers_against_their_closed_forms():
    model = _linear()
    exact = sum(p[c] * g ** 2 for x in X for c in range(3) for g, p in [_grad_log_p(x, c)]) / 3
    empirical = sum(_grad_log_p(x, y)[0] ** 2 for x, y in zip(X, Y)) / 3
    assert torch.allclose(fisher_diagonal(model, ["weight"], _batches(), "exact")[0], exact, atol=1e-6)
    assert torch.allclose(fisher_diagonal(model, ["weight"], _batches(), "empirical")[0], empirical, atol=1e-6)
    assert not torch.allclose(exact, empirical, atol=1e-3)
    # sampled: at labels drawn from p(.|x) (here the draws of the same generator), whatever the true labels
    (sampled,) = fisher_diagonal(model, ["weight"], [{"image": X, "label": Y}], "sampled",
                                 generator=torch.Generator().manual_seed(3))
    drawn = torch.multinomial(F.softmax(X @ W.T, 1), 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.allclose(sampled, sum(_grad_log_p(x, y)[0] ** 2 for x, y in zip(X, drawn)) / 3, atol=1e-6)
    # ... a one-label Monte-Carlo estimate of the exact Fisher: over 1000 draws per image, within a few percent
    many = [{"image": X.repeat(1000, 1), "label": Y.repeat(1000)}]
    (sampled,) = fisher_diagonal(model, ["weight"], many, "sampled", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampled, exact, rtol=0.15) and not torch.allclose(sampled, empirical, rtol=0.15)
    (capped,) = fisher_diagonal(model, ["weight"], _batches(), "exact", max_samples=2)  # the first 2 images
    assert torch.allclose(capped, sum(p[c] * g ** 2 for x in X[:2] for c in range(3)
                                      for g, p in [_grad_log_p(x, c)]) / 2, atol=1e-6)


class FakeLoop:
    """What on_stage_end reads of the loop: the experience's training batches."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, on, classes=None):
        assert on == "train"
        return self._batches


def _stage(i):
    return Stage("train", 1, info={"experience": i, "experiences": 3, "classes": (i,), "seen": tuple(range(i + 1))})


@pytest.mark.parametrize("online", [False, True])
def test_ewc_keeps_a_penalty_per_experience_or_one_running_fisher(online):
    method = EWC(_linear(), weight=2.0, variant="empirical", online=online, gamma=0.5)
    w1 = W + 0.1
    method.on_stage_start(_stage(0), None)
    method.on_stage_end(_stage(0), FakeLoop(_batches()))
    with torch.no_grad():
        method.student.weight.copy_(w1)
    method.on_stage_start(_stage(1), None)
    method.on_stage_end(_stage(1), FakeLoop(_batches(X[:2], Y[:2])))
    f0 = sum(_grad_log_p(x, y)[0] ** 2 for x, y in zip(X, Y)) / 3
    f1 = sum(_grad_log_p(x, y, w1)[0] ** 2 for x, y in zip(X[:2], Y[:2])) / 2
    if online:
        (only,) = method.penalties
        assert torch.allclose(only.importance0, 0.5 * f0 + f1, atol=1e-6) and torch.equal(only.anchor0, w1)
    else:
        first, second = method.penalties
        assert torch.allclose(first.importance0, f0, atol=1e-6) and torch.equal(first.anchor0, W)
        assert torch.allclose(second.importance0, f1, atol=1e-6) and torch.equal(second.anchor0, w1)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.on_stage_end(_stage(2), FakeLoop(_batches()))  # the last experience: nothing left to protect it in
    assert method.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in
                                                               method.state_dict().items())
    # a resumed run makes the same buffers before loading them
    fresh = EWC(_linear(), online=online)
    fresh.on_stage_start(_stage(2), None)
    fresh.load_state_dict(method.state_dict())


def test_the_ewc_and_mas_penalties_values_and_gradients():
    theta = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    fisher = [torch.tensor([[0.5, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 3.0]])]
    anchor = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, -2.0]])]
    ewc = EWC(nn.Linear(2, 2, bias=False), weight=3.0)
    with torch.no_grad():
        ewc.student.weight.copy_(theta)
    for f, a in zip(fisher, anchor):
        ewc.penalties.append(__import__("kdrun.methods.ewc", fromlist=["Anchors"]).Anchors([theta]))
        ewc.penalties[-1].fill([f], [a])
    # by hand: exp 0: 0.5*1 + 1*1 + 2*1 + 0 = 3.5; exp 1: 0 + 0 + 1*1 + 3*1 = 4; (3 / 2) * 7.5
    value = ewc.penalty()
    assert value.item() == pytest.approx(11.25)
    value.backward()
    expected = 3.0 * sum(f * (theta - a) for f, a in zip(fisher, anchor))  # lambda * sum_t F_t (theta - theta*_t)
    assert torch.allclose(ewc.student.weight.grad, expected)

    mas = MAS(nn.Linear(2, 2, bias=False), weight=0.5)
    with torch.no_grad():
        mas.student.weight.copy_(theta)
    mas.anchors.fill([fisher[0]], [anchor[0]])
    value = mas.penalty()
    assert value.item() == pytest.approx(0.5 * 3.5)
    value.backward()
    assert torch.allclose(mas.student.weight.grad, 2 * 0.5 * fisher[0] * (theta - anchor[0]))


def test_mas_importance_is_the_per_sample_mean_of_the_absolute_gradient_of_the_squared_output_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    names = [n for n, _ in model.named_parameters()]
    omega = mas_importance(model, names, _batches())
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for x in X:
        model.zero_grad()
        (model(x[None]) ** 2).sum().backward()
        for e, p in zip(expected, model.parameters()):
            e += p.grad.abs() / 3
    assert all(torch.allclose(o, e, atol=1e-6) for o, e in zip(omega, expected))
    model.zero_grad()
    (model(X) ** 2).sum(1).mean().backward()  # a mini-batch gradient, then its absolute value: smaller
    assert sum(p.grad.abs().sum() for p in model.parameters()) < 0.9 * sum(o.sum() for o in omega)
    # the importances add up over experiences, with the anchor at the latest
    method = MAS(model, weight=1.0)
    method.on_stage_end(_stage(0), FakeLoop(_batches()))
    method.on_stage_end(_stage(1), FakeLoop(_batches()))
    assert all(torch.allclose(w, 2 * e, atol=1e-6) for w, e in zip(method.anchors.importances(), expected))


def test_the_straight_through_mask_passes_the_binary_masks_gradient_to_the_real_mask():
    weight, x = torch.tensor([[0.5, -1.0], [2.0, 0.25]]), torch.tensor([1.0, 3.0])
    mask = torch.tensor([[0.01, 0.001], [0.02, -0.5]], requires_grad=True)
    binary = Binarize.apply(mask, 5e-3)
    assert torch.equal(binary, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    out = (weight * binary) @ x
    out.sum().backward()
    # d sum(out) / d binary_ij = weight_ij * x_j, passed to the real mask unchanged (also where the binary is 0)
    assert torch.equal(mask.grad, weight * x[None, :])


def _digits():
    return kdata.Data("digits", digits(), [0.3], [0.4], {"crop_padding": 1})


class Snapshots(Piggyback):
    """Keeps a copy of the whole state after each experience."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after = []

    def on_stage_end(self, stage, loop):
        self.after.append({k: v.clone() for k, v in self.state_dict().items()})


def _fit(method, experiences=3, epochs=1, run_dir=None, resume=None, trainer=(), data=None):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine", *trainer)
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": epochs})
    data = data or _digits()
    split = kscenario.Split(experiences=experiences)
    split.setup(data)
    method.setup(data)
    loaders = kdata.Loaders(data, kdata.BatchSpec(), 32, 512, "cpu", seed=0)
    return Engine(method, loaders, schedule, cfg.trainer, run_dir).fit(resume, split.stages(method, epochs)), split


def test_piggyback_freezes_the_backbone_keeps_earlier_masks_and_assembles_each_experiences_logits():
    torch.manual_seed(0)
    method = Snapshots(mlp(10, 1, 8))
    _, split = _fit(method)
    exp0, exp1, exp2 = method.after
    backbone = [k for k in exp0 if k.startswith("student.")]
    assert all(torch.equal(exp0[k], exp1[k]) and torch.equal(exp0[k], exp2[k]) for k in backbone)  # bit-identical
    masks1 = [k for k in exp1 if k.startswith("networks.masks.0.") or k.startswith("networks.heads.0.")]
    assert masks1 and all(torch.equal(exp1[k], exp2[k]) for k in masks1)  # experience 1's, while 2 trains
    assert any(not torch.equal(exp1[k], exp2[k]) for k in exp2 if k.startswith("networks.heads.1."))
    assert any(not torch.equal(exp0[k], exp1[k]) for k in exp1 if k.startswith("networks.masks.0."))
    # the assembled logits: experience t's classes from a direct forward of t's network, written out here
    loaders = kdata.Loaders(_digits(), kdata.BatchSpec(), 32, 64, "cpu", seed=0)
    net, x, s = method.networks.eval(), next(iter(loaders.evaluation(kdata.EvalSet("test"))))["image"], method.student
    logits = net(x)
    for t, classes in enumerate(split.groups):
        if t == 0:
            direct = s(x)
        else:
            m1, m2 = [(net.masks[t - 1][k] > 5e-3).float() for k in ("hidden_fc1_weight", "hidden_fc2_weight")]
            h = F.relu(F.linear(x.flatten(1), s.hidden.fc1.weight * m1, s.hidden.fc1.bias))
            h = F.relu(F.linear(h, s.hidden.fc2.weight * m2, s.hidden.fc2.bias))
            direct = net.heads[t - 1](h)
        assert torch.allclose(logits[:, list(classes)], direct[:, list(classes)], atol=1e-6)


StopsEWC = preempted(EWC)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# experience 0 trains 2 epochs of 18 steps: stopped at its last step (before its Fisher), or in experience 1's second
# epoch (with experience 0's penalty to restore); sampled Fisher, so the RNG streams matter too
@pytest.mark.parametrize("stop_at, online", [(36, False), (36 + 13 + 5, True)])
def test_an_ewc_run_resumes_exactly_within_and_between_experiences(tmp_path, stop_at, online):
    kw = dict(weight=5.0, variant="sampled", online=online, fisher_samples=100)
    trainer = ("trainer.checkpoint_every_steps=3",)
    uninterrupted = StopsEWC(_net(), **kw)
    whole, _ = _fit(uninterrupted, 3, 2, tmp_path / "whole", trainer=trainer)
    with pytest.raises(Interrupted):
        _fit(StopsEWC(_net(), stop_at=stop_at, **kw), 3, 2, tmp_path / "stopped", trainer=trainer)
    method = StopsEWC(_net(), **kw)
    resumed, _ = _fit(method, 3, 2, tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "last.pt", trainer)
    assert len(whole["stage_results"]) == 3 and resumed["stage_results"] == whole["stage_results"]
    final, state = uninterrupted.state_dict(), method.state_dict()  # the Fishers and anchors included
    assert set(final) == set(state) and any(".importance0" in k for k in final)
    assert all(torch.equal(v, state[k]) for k, v in final.items())


@pytest.mark.parametrize("method", [pytest.param("ewc", marks=pytest.mark.slow), "mas",
                                    pytest.param("piggyback", marks=pytest.mark.slow)])  # ~25 s each, shared CPU
def test_kdrun_split_runs_each_method_end_to_end(tmp_path, method):
    kdrun("scenario=split", "dataset=digits", f"method={method}", "student=mlp", "logger=none", "schedule.epochs=2",
          f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    matrices = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert [len(matrices[p]) for p in ("class_il", "task_il")] == [5, 5] and len(matrices["task_il"][0]) == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("cl/class_il/acc", "cl/task_il/acc", "cl/class_il/bwt", "cl/task_il/bwt"):
        assert summary[key] is not None
    assert summary["cl/task_il/acc"] == pytest.approx(sum(matrices["task_il"][4]) / 5)
    assert summary["cl/task_il/acc"] > 0.6
    if method == "piggyback":  # every earlier experience's network is untouched by later ones
        r = matrices["task_il"]
        assert all(r[i][j] == r[j][j] for j in range(5) for i in range(j, 5))
