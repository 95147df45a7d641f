"""Faults a user meets around a run: a rerun of another config in a run dir, two processes at once, a corrupt
cached teacher, a broken or empty file, a full or read-only disk, a loss that becomes NaN. Each ends in one
sentence (or is survived), and a command refused before it trains leaves its run dir as it found it."""

import errno
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import kdrun, make_cfg, one_thread_env
from kdrun import checkpoint, data as kdata
from kdrun.data.sources import digits
from kdrun.engine import Engine
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.rundir import check_same_run, identity
from kdrun.methods.kd import KD
from kdrun.methods.supervised import Supervised
from kdrun.teacher import get_teacher

RUN = ["dataset=digits", "logger=none", "teacher=mlp", "student=mlp", "schedule.epochs=1", "schedule.batch_size=64",
       "trainer.device=cpu"]
not_as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def one_sentence(proc) -> str:
    err = proc.stderr
    assert proc.returncode == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("kdrun: error: ")]
    return line


# ---- a run dir belongs to one run -------------------------------------------------------------------------------
def test_a_rerun_with_another_method_is_refused_and_changes_nothing_in_the_run_dir(tmp_path):
    kdrun(*RUN, "method=kd", "hydra.run.dir=run", cwd=tmp_path)
    before = tree(tmp_path / "run")
    assert {".hydra/overrides.yaml", "checkpoints/last.pt"} <= set(before) and any(f.endswith(".log") for f in before)
    proc = kdrun(*RUN, "method=dkd", "hydra.run.dir=run", cwd=tmp_path, check=False)
    line = one_sentence(proc)
    assert "method._target_=kdrun.methods.dkd.DKD (the run dir has kdrun.methods.kd.KD)" in line
    assert "fresh hydra.run.dir" in line
    assert tree(tmp_path / "run") == before  # Hydra's config, overrides and job log as they were


def test_what_may_change_between_the_sessions_of_a_run_is_not_its_identity():
    same = identity(make_cfg(*RUN))
    assert identity(make_cfg(*RUN, "logger=wandb", "trainer.device=cuda", "trainer.log_every=7", "resume=true",
                             "trainer.checkpoint_every_steps=5", "paths.data_dir=/elsewhere")) == same
    for other in ("seed=1", "method=dkd", "trainer.max_steps=5", "dataset.val_size=0.2", "dataset.val_size=null",
                  "teacher.epochs=3"):
        assert identity(make_cfg(*RUN, other)) != same, other


def test_a_run_from_before_a_field_existed_continues_while_the_field_is_left_unset(tmp_path):
    """A field a later kdrun added (student.init, dataset.classes...) is absent from an older last.pt's config: left
    null or empty it changes nothing, so the run continues; given a value, it is another run."""
    cfg = make_cfg(*RUN)
    older = {k: v for k, v in identity(cfg).items() if k not in ("student.init", "student.freeze", "dataset.classes")}
    assert len(older) == len(identity(cfg)) - 3
    checkpoint.save({"config": older}, tmp_path / "checkpoints" / "last.pt")
    check_same_run(cfg, tmp_path)
    with pytest.raises(KdrunError, match=r"student.init=best.pt \(the run dir has <unset>\)"):
        check_same_run(make_cfg(*RUN, "student.init=best.pt"), tmp_path)


def test_a_bad_value_leaves_no_run_dir(tmp_path):
    proc = kdrun(*RUN, "method=supervised", "trainer.precision=64", "hydra.run.dir=outputs/new/run", cwd=tmp_path,
                 check=False)
    assert "trainer.precision" in one_sentence(proc)
    assert not (tmp_path / "outputs").exists()  # nor the folders Hydra made for it


def test_a_second_process_in_a_run_dir_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)  # as a run in progress holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = kdrun(*RUN, "method=kd", "hydra.run.dir=run", cwd=tmp_path, check=False)
    finally:
        os.close(fd)
    assert f"another kdrun process is running in {run_dir}" in one_sentence(proc)
    assert tree(run_dir) == before


# ---- Ctrl-C -----------------------------------------------------------------------------------------------------
# tests/test_long_runs.py: SIGINT mid-epoch, exit 130, then the same command ends with the uninterrupted result


# ---- the teacher cache ------------------------------------------------------------------------------------------
def _teacher_cfg(tmp_path):
    return make_cfg("dataset=digits", "teacher=mlp", "schedule.epochs=1", "trainer.device=cpu",
                    f"paths.cache_dir={tmp_path}")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _modify(path: Path) -> None:
    """A file that still loads: one weight changed, the rest (its checksum too) kept."""
    ckpt = torch.load(path, weights_only=True)
    first = next(iter(ckpt["model"]))
    ckpt["model"][first].view(-1)[0] += 1
    torch.save(ckpt, path)


@pytest.mark.parametrize("damage", [_truncate, _modify])
def test_a_corrupt_cached_teacher_is_trained_again_with_a_warning(tmp_path, caplog, damage):
    cfg = _teacher_cfg(tmp_path)
    data = kdata.build(cfg.dataset)
    teacher, acc = get_teacher(cfg, data, "cpu")
    (path,) = tmp_path.glob("teachers/*/teacher.pt")
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    damage(path)
    with caplog.at_level(logging.INFO, logger="kdrun"):
        again, acc_again = get_teacher(cfg, data, "cpu")
    assert f"the cached {path}" in caplog.text and "training it again" in caplog.text
    assert acc_again == acc and all(torch.equal(v, again.state_dict()[k]) for k, v in weights.items())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdrun"):
        get_teacher(cfg, data, "cpu")  # the file written again is sound
    assert "reusing" in caplog.text and "training" not in caplog.text


@pytest.mark.slow  # ~30 s on two busy cores
def test_two_runs_started_together_on_a_fresh_cache_train_the_teacher_once(tmp_path):
    env = {**one_thread_env(), "KDRUN_CACHE_DIR": str(tmp_path / "cache")}
    args = [*RUN, "teacher=cnn", "teacher.epochs=5", "method=kd"]
    procs = [subprocess.Popen([sys.executable, "-m", "kdrun", *args, f"hydra.run.dir=run{i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("teacher: none given") for o in outs) == 1, outs  # one trained it
    assert sum(o.count("teacher: reusing cnn") for o in outs) == 1, outs  # the other waited for it and reused it
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1
    summaries = [json.loads((tmp_path / f"run{i}" / "summary.json").read_text()) for i in (0, 1)]
    assert summaries[0]["teacher/test_acc"] == summaries[1]["teacher/test_acc"]
    assert summaries[0]["test/acc"] == summaries[1]["test/acc"]


# ---- NaN --------------------------------------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _engine(method, run_dir, lr=0.1):
    cfg = make_cfg("dataset=digits", "schedule=sgd_cosine")
    loaders = kdata.Loaders(kdata.Data("digits", digits(), [0.3], [0.4], {}), kdata.BatchSpec(), 64, 512, "cpu", seed=0)
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": 2, "optimizer": {"lr": lr}})
    return Engine(method, loaders, schedule, cfg.trainer, run_dir=run_dir, device="cpu")


def test_a_nan_from_a_zero_temperature_says_so_and_that_there_is_no_checkpoint(tmp_path):
    with pytest.raises(KdrunError) as e:
        _engine(KD(_net(), _net(), temperature=0.0), tmp_path).fit()
    message = str(e.value)
    assert "train/kd" in message and "no checkpoint was written yet" in message
    assert "method.temperature=0.0 divides the logits by zero" in message and "learning rate" not in message
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_nan_without_a_known_cause_names_the_optimisation_and_no_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(KdrunError) as e:  # an absurd learning rate: the loss overflows in the first epoch
        _engine(Supervised(_net()), tmp_path, lr=1e6).fit()
    message = str(e.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and "no checkpoint was written yet" in message
    assert "lower the learning rate (schedule.optimizer.lr)" in message and "temperature" not in message
    # with a checkpoint: tests/test_engine.py, test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint


# ---- broken files ------------------------------------------------------------------------------------------------
def test_an_empty_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(KdrunError, match=r"last.pt is empty \(0 bytes"):
        checkpoint.load(tmp_path / "last.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04")  # an error whose message may be empty
    with pytest.raises(KdrunError, match=r"cannot read checkpoint .*junk.pt"):
        checkpoint.load(tmp_path / "junk.pt")


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    rows = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (5, 10, 15)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(rows) + '{"step": 20, "train/lo')  # killed while writing
    logger = RunLogger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        logger.rewind(10)
    logger.close()
    assert path.read_text() == "".join(rows[:2]) and "cut off" in caplog.text
    path.write_text(rows[0] + "garbage\n" + rows[1])  # not a crash's trace: one sentence
    logger = RunLogger(tmp_path)
    with pytest.raises(KdrunError, match=r"line 2 of .*metrics.jsonl is not a row kdrun wrote"):
        logger.rewind(10)
    logger.close()


def test_a_full_disk_while_writing_a_checkpoint_is_one_sentence(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(KdrunError, match=r"no space left to write .*last.pt .*free space"):
        checkpoint.save({"x": 1}, tmp_path / "checkpoints" / "last.pt")
    assert not list((tmp_path / "checkpoints").iterdir())  # no half-written file


@not_as_root
def test_a_read_only_run_dir_or_cache_dir_is_one_sentence(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(0o555)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o555)
    try:
        proc = kdrun(*RUN, "hydra.run.dir=run", cwd=tmp_path, check=False)
        assert f"cannot write {tmp_path / 'run'}" in one_sentence(proc)
        proc = kdrun(*RUN, "hydra.run.dir=run2", f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, check=False)
        assert f"cannot write {tmp_path / 'cache'}" in one_sentence(proc) and not (tmp_path / "run2").exists()
    finally:
        (tmp_path / "run").chmod(0o755)
        (tmp_path / "cache").chmod(0o755)


def test_a_method_field_added_later_continues_at_its_default_and_not_at_another_value(tmp_path):
    """DFAD's balance_weight came after runs that had none: 0.0, its default, is the objective those runs trained."""
    cfg = make_cfg(*RUN, "method=dfad")
    older = {k: v for k, v in identity(cfg).items() if k != "method.balance_weight"}
    checkpoint.save({"config": older}, tmp_path / "checkpoints" / "last.pt")
    check_same_run(cfg, tmp_path)
    with pytest.raises(KdrunError, match=r"method.balance_weight=2.0 \(the run dir has <unset>\)"):
        check_same_run(make_cfg(*RUN, "method=dfad", "method.balance_weight=2.0"), tmp_path)
