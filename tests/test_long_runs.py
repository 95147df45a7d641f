"""Long runs: a run killed or preempted mid-epoch and continued, and a run split over data-parallel
ranks, both end with the result of one process that trained without a stop (same seed, CPU)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import one_thread_env

RUN = ["dataset=digits", "logger=none", "method=kd", "teacher=mlp", "student=mlp", "schedule.epochs=3",
       "schedule.batch_size=32", "trainer.device=cpu", "trainer.checkpoint_every_steps=5"]
STEPS = (1437 - 142) // 32  # per epoch: digits less the tenth held out for validation (the default val_size)


def start(run_dir, *args):
    return subprocess.Popen([sys.executable, "-m", "kdrun", *RUN, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                            env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir, *args) -> str:
    proc = start(run_dir, *args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    return out


def wait_for_checkpoint(proc, path, ready, timeout=300) -> dict:
    """Poll `path` until `ready(checkpoint)`; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            ckpt = torch.load(path, weights_only=True)
            if ready(ckpt):
                return ckpt
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)
    raise TimeoutError(path)


def result(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"], rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    finish(run_dir)  # also trains and caches the teacher, before any timing matters
    return result(run_dir)


def test_sigterm_then_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_result(tmp_path, uninterrupted):
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    proc = start(run_dir)  # SIGTERM (a preemption's warning): a checkpoint at that step, a clean exit
    wait_for_checkpoint(proc, last, lambda c: c["step"] >= 10)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    ckpt = torch.load(last, weights_only=True)
    assert f"stopped by SIGTERM; {last} holds step {ckpt['step']}" in err and "Traceback" not in err
    assert ckpt["step"] == STEPS * ckpt["epoch"] + ckpt["batch_in_epoch"]  # written at the step it stopped
    assert not (run_dir / "summary.json").exists() and not list(last.parent.glob(".*"))

    proc = start(run_dir)  # the same command continues; SIGKILL it in the middle of the second epoch
    ckpt = wait_for_checkpoint(proc, last, lambda c: c["epoch"] == 1 and c["batch_in_epoch"] > 0)
    proc.kill()
    proc.wait()
    assert 0 < ckpt["batch_in_epoch"] < STEPS and not (run_dir / "summary.json").exists()

    finish(run_dir)
    (summary, weights, rows), (want, want_weights, want_rows) = result(run_dir), uninterrupted
    for key in ("test/acc", "test/acc_best", "test/best_epoch", "val/acc", "val/best_epoch", "test/acc_at_best_val",
                "steps", "epochs", "teacher/test_acc"):
        assert summary[key] == want[key], key
    assert all(torch.equal(weights[k], v) for k, v in want_weights.items())
    assert [r["step"] for r in rows if "test/acc" in r] == [STEPS, 2 * STEPS, 3 * STEPS]  # no step logged twice
    assert [r["test/acc"] for r in rows if "test/acc" in r] == [r["test/acc"] for r in want_rows if "test/acc" in r]


@pytest.mark.slow  # ~60 s on two busy cores
def test_ctrl_c_stops_with_a_checkpoint_and_the_same_command_finishes_the_run(tmp_path, uninterrupted):
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    proc = start(run_dir)
    wait_for_checkpoint(proc, last, lambda c: c["step"] >= 10)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out + err
    ckpt = torch.load(last, weights_only=True)
    assert f"stopped by SIGINT; {last} holds step {ckpt['step']}" in err and "Traceback" not in err
    assert f"hydra.run.dir={run_dir} to continue" in err
    assert ckpt["step"] == STEPS * ckpt["epoch"] + ckpt["batch_in_epoch"] and not (run_dir / "summary.json").exists()
    finish(run_dir)
    (summary, weights, _), (want, want_weights, _) = result(run_dir), uninterrupted
    for key in ("test/acc", "test/acc_best", "steps", "epochs", "teacher/test_acc"):
        assert summary[key] == want[key], key
    assert all(torch.equal(weights[k], v) for k, v in want_weights.items())


def test_two_ranks_spawned_by_kdrun_train_as_one_process(tmp_path, uninterrupted):
    out = finish(tmp_path / "run", "trainer.devices=2")  # a global batch of 32: 16 per rank
    summary, weights, rows = result(tmp_path / "run")
    want, want_weights, _ = uninterrupted
    assert out.count("kdrun kd on digits") == 1  # one rank prints
    assert summary["steps"] == want["steps"] and summary["test/acc"] == pytest.approx(want["test/acc"], abs=0.01)
    assert summary["val/acc"] == pytest.approx(want["val/acc"], abs=0.01)  # every rank held out the same images
    for k, v in want_weights.items():  # the same updates, up to the order of floating-point sums
        torch.testing.assert_close(weights[k], v, atol=1e-4, rtol=1e-4)
    assert [r["step"] for r in rows if "test/acc" in r] == [STEPS, 2 * STEPS, 3 * STEPS]  # one rank logs
