"""Continual scenarios (kdrun/scenario.py): experiences, their stages and evaluation sets, the matrices' summary,
and a split run end to end and resumed."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import kdrun, make_cfg, preempted
from kdrun import data as kdata, scenario as kscenario
from kdrun.data.sources import digits
from kdrun.engine import Engine, Interrupted
from kdrun.errors import KdrunError
from kdrun.methods.base import Stage
from kdrun.methods.supervised import Supervised


def _data(val_size=None):
    data = kdata.Data("digits", digits(), [0.3], [0.4], {"crop_padding": 1})
    return kdata.hold_out(data, OmegaConf.create({"val_size": val_size, "split_seed": 0})) if val_size else data


def _split(**kw):
    split = kscenario.Split(**kw)
    split.setup(_data())
    return split


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_classes_are_cut_into_experiences_in_the_given_order():
    assert _split().groups == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert _split(experiences=3).groups == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    shuffled = _split(class_order="shuffle", seed=1).groups
    assert shuffled == _split(class_order="shuffle", seed=1).groups != _split(class_order="shuffle", seed=2).groups
    assert sorted(c for g in shuffled for c in g) == list(range(10)) and shuffled != _split().groups
    assert _split(experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]).groups == [(9, 8, 7, 6, 5), (4, 3, 2, 1, 0)]
    with pytest.raises(KdrunError, match="scenario.experiences=11, but digits has 10 classes"):
        _split(experiences=11)
    with pytest.raises(KdrunError, match=r"scenario.class_order=\[0, 0, 1.*give each of 0..9 once"):
        _split(class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])


class TwoPhase(Supervised):
    """A method of two stages per experience, the second continuing the first's optimizer."""

    def experience_stages(self, epochs, experience):
        return [Stage("warm", 1, info={"mine": 1}), Stage("train", epochs, fresh_optimizer=False)]


def test_each_experience_draws_its_classes_and_reports_every_experience_under_both_protocols():
    split = _split()
    stages = split.stages(TwoPhase(_net()), 3)
    assert [s.name for s in stages[:3]] == ["exp0/warm", "exp0/train", "exp1/warm"] and len(stages) == 10
    assert [s.data.classes for s in stages[::2]] == split.groups
    assert [s.fresh_optimizer for s in stages[:4]] == [True, False, True, False]
    assert stages[2].info == {"mine": 1, "experience": 1, "experiences": 5, "classes": (2, 3), "seen": (0, 1, 2, 3)}
    sets = {s.name: s for s in stages[2].evaluate}
    assert sets["test"].classes == sets["test"].mask == (0, 1, 2, 3)
    for j, group in enumerate(split.groups):
        assert sets[f"class_il/exp{j}"].classes == group and sets[f"class_il/exp{j}"].mask == (0, 1, 2, 3)
        assert sets[f"task_il/exp{j}"].classes == group and sets[f"task_il/exp{j}"].mask == group  # no other class
    cumulative = _split(cumulative=True, fresh_optimizer=False).stages(Supervised(_net()), 2)
    assert [s.data.classes for s in cumulative] == [(0, 1), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5), tuple(range(8)),
                                                     tuple(range(10))]
    assert [s.fresh_optimizer for s in cumulative] == [True, False, False, False, False]


def test_a_method_stage_with_its_own_data_is_refused_under_a_scenario():
    class OwnData(Supervised):
        def stages(self, epochs):
            return [Stage("train", epochs, data=kdata.Selection(classes=(0,)))]

    with pytest.raises(KdrunError, match="chooses its own data or evaluation.*without scenario="):
        _split().stages(OwnData(_net()), 1)


def test_the_summary_of_an_accuracy_matrix():
    r = [[0.9, 0.1, 0.0],
         [0.6, 0.8, 0.2],
         [0.3, 0.7, 1.0]]
    s = kscenario.summary({"class_il": r, "task_il": r[:2]})
    assert s["cl/class_il/acc"] == pytest.approx((0.3 + 0.7 + 1.0) / 3)
    assert s["cl/class_il/bwt"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert s["cl/class_il/forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)
    assert s["cl/task_il/acc"] == pytest.approx((0.6 + 0.8) / 2)  # a run cut short: the rows it reached
    assert kscenario.summary({"class_il": [[0.5, 0.0]]}) == {"cl/class_il/acc": 0.5, "cl/class_il/bwt": None,
                                                            "cl/class_il/forgetting": None}


Stops = preempted(Supervised)


# experience 0 trains 2 epochs of 18 steps: stopped at its last step, or in experience 1's second epoch
@pytest.mark.parametrize("stop_at", [36, 36 + 13 + 5])
def test_a_split_run_resumes_exactly_within_and_between_experiences(tmp_path, stop_at):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine", "trainer.checkpoint_every_steps=3")
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": 2})
    split = kscenario.Split(experiences=3)
    split.setup(_data())

    def fit(method, run_dir, resume=None):
        loaders = kdata.Loaders(_data(), kdata.BatchSpec(), 32, 512, "cpu", seed=0)
        return Engine(method, loaders, schedule, cfg.trainer, run_dir).fit(resume, split.stages(method, 2))

    whole = fit(Stops(_net()), tmp_path / "whole")
    with pytest.raises(Interrupted):
        fit(Stops(_net(), stop_at=stop_at), tmp_path / "stopped")
    resumed_method = Stops(_net())
    resumed = fit(resumed_method, tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert len(whole["stage_results"]) == 3 and resumed["stage_results"] == whole["stage_results"]
    final = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in resumed_method.student.state_dict().items())


def test_kdrun_split_writes_the_matrices_and_the_summary(tmp_path):
    kdrun("scenario=split", "dataset=digits", "method=supervised", "student=mlp", "logger=none", "schedule.epochs=2",
          f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    matrices = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert matrices["experiences"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [len(matrices[p]) for p in ("class_il", "task_il")] == [5, 5] and len(matrices["class_il"][0]) == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cl/class_il/acc"] == pytest.approx(sum(matrices["class_il"][4]) / 5)
    assert summary["cl/task_il/acc"] == pytest.approx(sum(matrices["task_il"][4]) / 5)
    assert summary["test/acc"] == pytest.approx(summary["cl/class_il/acc"], abs=0.02)  # the whole test set
    assert all(matrices["class_il"][i][j] == 0 for i in range(5) for j in range(i + 1, 5))  # unseen classes masked
    assert summary["cl/task_il/acc"] > summary["cl/class_il/acc"] + 0.3  # fine-tuning forgets; a mask hides it
    assert (tmp_path / "scenario.json").is_file() and "stage_results" not in summary
