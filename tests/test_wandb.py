"""W&B as its users expect, with `wandb` replaced by a recorder (no network): the server and project from the
environment, job types, the run's URL, the teacher as an artifact the student's run uses, best.pt uploaded with
aliases, and one `wandb sync` command for a sweep's offline runs."""

import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from kdrun import loggers
from kdrun.sweep import wandb_sync_command


class FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls, self.kwargs = calls, kwargs
        self.id = kwargs.get("id") or "r1"
        self.offline = kwargs["mode"] == "offline"
        self.url = None if self.offline else f"https://wandb.example.org/me/kdrun/runs/{self.id}"
        self.summary = {}

    def log(self, metrics, step=None):
        pass

    def log_model(self, path, name=None, aliases=None):
        self.calls.append(("log_model", self.kwargs["job_type"], Path(path).name, aliases))

    def log_artifact(self, path, name=None, type=None, aliases=None):
        self.calls.append(("log_artifact", self.kwargs["job_type"], name, Path(path).read_bytes()))

    def use_artifact(self, artifact):
        self.calls.append(("use_artifact", self.kwargs["job_type"], artifact.name, Path(artifact.file).read_bytes()))

    def finish(self):
        self.calls.append(("finish", self.kwargs["job_type"]))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module that records what kdrun asks of it; online with a key and a reachable server."""
    calls = []

    class Artifact:
        def __init__(self, name, type):
            self.name, self.type, self.file = name, type, None

        def add_file(self, path):
            self.file = path

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls, **kwargs)

    module = types.SimpleNamespace(init=init, Settings=lambda **kw: kw, Artifact=Artifact)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    reached = []
    monkeypatch.setattr(loggers, "_reachable", lambda host, port: reached.append((host, port)) or True)
    return calls, reached


def test_project_and_entity_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "distil-study")
    monkeypatch.setenv("WANDB_ENTITY", "my-lab")
    cfg = make_cfg("logger=wandb").logger
    assert (cfg.project, cfg.entity) == ("distil-study", "my-lab")
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.delenv("WANDB_ENTITY")
    cfg = make_cfg("logger=wandb").logger
    assert (cfg.project, cfg.entity) == ("kdrun", None)


def test_a_self_hosted_server_is_the_one_checked_and_the_url_is_printed(fake_wandb, monkeypatch, tmp_path, caplog):
    calls, reached = fake_wandb
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.org:8080")
    cfg = make_cfg("logger=wandb", "logger.mode=online").logger
    with caplog.at_level(logging.INFO, logger="kdrun.loggers"):
        logger = loggers.RunLogger(tmp_path, cfg, {}, job_type="distill")
        logger.close()
    assert reached == [("wandb.example.org", 8080)]
    (_, kwargs), = [c for c in calls if c[0] == "init"]
    assert kwargs["mode"] == "online" and kwargs["job_type"] == "distill"
    urls = [r.getMessage() for r in caplog.records if "https://wandb.example.org/" in r.getMessage()]
    assert len(urls) == 1


def test_an_unreachable_self_hosted_server_means_offline(fake_wandb, monkeypatch, tmp_path, caplog):
    calls, _ = fake_wandb
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    monkeypatch.setattr(loggers, "_reachable", lambda host, port: False)
    with caplog.at_level(logging.INFO, logger="kdrun.loggers"):
        loggers.RunLogger(tmp_path, make_cfg("logger=wandb", "logger.mode=online").logger, {}).close()
    assert calls[0][1]["mode"] == "offline"
    assert "wandb.example.org:443 is unreachable" in caplog.text and "https://" not in caplog.text.split("W&B:")[-1]


def test_the_teacher_is_an_artifact_the_students_run_uses_and_best_pt_is_uploaded(fake_wandb, tmp_path):
    from kdrun.run import run

    torch.set_num_threads(1)
    calls, _ = fake_wandb
    base = ["dataset=digits", "teacher=mlp", "student=mlp", "method=kd", "schedule.epochs=1", "logger=wandb",
            "logger.mode=online", "logger.log_model=true", f"paths.cache_dir={tmp_path / 'cache'}"]
    run(make_cfg(*base), tmp_path / "a")
    (teacher_pt,) = (tmp_path / "cache").glob("teachers/*/teacher.pt")
    teacher = teacher_pt.read_bytes()
    assert [c[1]["job_type"] for c in calls if c[0] == "init"] == ["teacher", "distill"]
    assert ("log_artifact", "teacher", "teacher-mlp", teacher) in calls
    assert ("use_artifact", "distill", "teacher-mlp", teacher) in calls
    assert ("log_model", "distill", "best.pt", ["best", "latest"]) in calls
    assert calls.index(("finish", "teacher")) < [c[0] for c in calls].index("use_artifact")
    calls.clear()
    run(make_cfg(*base, "method=supervised"), tmp_path / "b")  # no teacher: a training run, nothing used
    assert [c[1]["job_type"] for c in calls if c[0] == "init"] == ["train"]
    assert not [c for c in calls if c[0] in ("use_artifact", "log_artifact")]


def test_one_wandb_sync_command_covers_a_sweeps_offline_runs(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
    assert wandb_sync_command(sweep, cache) is None  # nothing logged offline
    (cache / "teachers" / "old" / "wandb" / "offline-run-0").mkdir(parents=True)
    os.utime(cache / "teachers" / "old" / "wandb" / "offline-run-0", (0, 0))  # before the sweep: not its own
    (sweep / "0" / "wandb" / "offline-run-a").mkdir(parents=True)
    (sweep / "1" / "wandb" / "offline-run-b").mkdir(parents=True)
    teacher = cache / "teachers" / "k" / "wandb" / "offline-run-c"
    teacher.mkdir(parents=True)
    assert wandb_sync_command(sweep, cache) == f"wandb sync {sweep}/*/wandb/offline-run-* {teacher}"
    for d in (sweep / "0" / "wandb" / "offline-run-a", sweep / "1" / "wandb" / "offline-run-b", teacher):
        (d / "run-x.wandb.synced").write_text("")  # what `wandb sync` leaves behind
    assert wandb_sync_command(sweep, cache) is None
