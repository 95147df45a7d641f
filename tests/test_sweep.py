"""Sweeps end to end: one run dir per job, a failed job recorded without stopping the others, the sweep
summary, launchers and Optuna (when their extras are installed), and the table and plot scripts."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import make_cfg, one_thread_env

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BASE = ["dataset=digits", "logger=none", "schedule.epochs=2", "schedule.batch_size=64", "teacher=mlp"]


def kdrun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kdrun", "-m", *BASE, *args], cwd=cwd, env=one_thread_env(),
                          capture_output=True, text=True, timeout=600)


def script(name, *args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def summary_rows(sweep_dir):
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """method x seed on digits, and a student that does not exist: 4 jobs train, 4 fail."""
    root = tmp_path_factory.mktemp("sweep")
    proc = kdrun("method=supervised,kd", "seed=0,1", "student=mlp", "student.name=mlp,resnt18",
                 "hydra.sweep.dir=sweep", cwd=root)
    return root / "sweep", proc


def test_a_failed_job_is_reported_and_the_others_run(sweep):
    sweep_dir, proc = sweep
    assert proc.returncode == 1, proc.stderr
    assert "4 of 8 jobs did not finish" in proc.stderr and "unknown model 'resnt18'" in proc.stderr
    rows = summary_rows(sweep_dir)
    assert [r["job"] for r in rows] == [str(i) for i in range(8)]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 4 and all("student.name=resnt18" in r["overrides"] for r in failed)
    assert all("unknown model 'resnt18'" in r["error"] for r in failed)
    assert all((sweep_dir / r["run_dir"] / "error.txt").is_file() for r in failed)


def test_sweep_summary_has_a_row_per_job_with_its_result(sweep):
    sweep_dir, _ = sweep
    ok = [r for r in summary_rows(sweep_dir) if r["status"] == "ok"]
    assert len(ok) == 4 and len({r["run_dir"] for r in ok}) == 4  # one run dir per job
    for r in ok:
        summary = json.loads((sweep_dir / r["run_dir"] / "summary.json").read_text())
        assert float(r["test/acc"]) == summary["test/acc"] and float(r["wall_s"]) == summary["wall_s"]
        assert f"seed={summary['seed']}" in r["overrides"] and f"method={summary['method']}" in r["overrides"]


def test_make_table_of_a_real_sweep(sweep, tmp_path):
    sweep_dir, _ = sweep
    ref = tmp_path / "ref.yaml"
    ref.write_text("kd:\n  mlp/mlp: 50.0\n")
    proc = script("make_table.py", sweep_dir, "--rows", "method", "--cols", "teacher,student.name", "--protocol", "best-test",
                  "--reference", ref, "--teacher-row")
    assert proc.returncode == 0, proc.stderr
    assert "left out 4 run dir(s)" in proc.stderr
    accs = {}
    for f in sweep_dir.glob("*/summary.json"):
        s = json.loads(f.read_text())
        accs.setdefault(s["method"], []).append(100 * s["test/acc_best"])
    lines = proc.stdout.splitlines()
    assert lines[0] == "| method \\ teacher/student.name | mlp/mlp |"
    kd = f"{statistics.fmean(accs['kd']):.2f} ± {statistics.stdev(accs['kd']):.2f}"
    assert f"| kd | {kd} ({50:.2f}, {statistics.fmean(accs['kd']) - 50:+.2f}) |" in lines
    assert any(line.startswith("| supervised | ") for line in lines) and lines[2].startswith("| teacher | ")
    assert "on digits at the best epoch" in proc.stdout and "over 2 runs (seeds)" in proc.stdout


def test_make_table_shows_chosen_summary_keys_one_column_each(sweep):
    sweep_dir, _ = sweep
    proc = script("make_table.py", sweep_dir, "--rows", "method", "--cols", "student.name",
                  "--metrics", "test/acc,test/acc_best")
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(f.read_text()) for f in sweep_dir.glob("*/summary.json")]
    best = [100 * s["test/acc_best"] for s in runs if s["method"] == "kd"]
    lines = proc.stdout.splitlines()
    assert lines[0] == "| method \\ student.name | test/acc | test/acc_best |"
    assert any(line.startswith("| kd | ") and line.endswith(f" | {statistics.fmean(best):.2f} ± "
                                                            f"{statistics.stdev(best):.2f} |") for line in lines)
    proc = script("make_table.py", sweep_dir, "--metrics", "cl/class_il/acc")
    assert proc.returncode != 0 and "no run's summary.json has cl/class_il/acc" in proc.stderr


def test_make_table_refuses_cells_that_mix_settings(sweep):
    proc = script("make_table.py", sweep[0], "--rows", "seed", "--cols", "student.name")
    assert proc.returncode != 0 and "differ in method" in proc.stderr


def test_plot_runs_draws_a_png(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs.png"
    proc = script("plot_runs.py", sweep[0], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "4 runs" in proc.stdout


def test_wandb_groups_a_sweep_and_tags_its_overrides():
    from kdrun.cli import _name_wandb_run

    cfg = make_cfg("logger=wandb")
    hc = SimpleNamespace(sweep=SimpleNamespace(dir="outputs/multirun/2025-01-02/03-04-05-000006"),
                         overrides=SimpleNamespace(task=["method.temperature=4", "seed=1"]))
    _name_wandb_run(cfg, hc, sweep=True)
    assert cfg.logger.group == "2025-01-02-03-04-05-000006"
    assert list(cfg.logger.tags) == ["method.temperature=4", "seed=1"]


def test_wandb_logs_the_best_checkpoint_as_an_artifact_when_asked(tmp_path):
    from kdrun.loggers import RunLogger

    logged = []
    logger = RunLogger(tmp_path)
    logger.wandb = SimpleNamespace(id="abc", log_model=lambda path, name, aliases: logged.append((path, name, aliases)))
    logger.checkpoint(tmp_path / "best.pt")
    assert logged == []  # logger.log_model defaults to false
    logger.log_model = True
    logger.checkpoint(tmp_path / "best.pt")
    assert logged == [(str(tmp_path / "best.pt"), "model-abc", ["best", "latest"])]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_side_by_side(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = kdrun("hydra/launcher=parallel", "method=supervised", "student=mlp", "seed=0,1", "hydra.sweep.dir=s",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in summary_rows(tmp_path / "s")] == ["ok", "ok"]


@pytest.mark.slow
def test_optuna_search_maximises_validation_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = kdrun("hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", "student=mlp", "hydra.sweep.dir=s",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = summary_rows(tmp_path / "s")
    best = OmegaConf.load(tmp_path / "s" / "optimization_results.yaml")
    assert len(rows) == 2 and best.best_value == max(float(r["val/acc"]) for r in rows)
    assert {"method.temperature", "method.alpha", "schedule.optimizer.lr"} == set(best.best_params)


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = kdrun("hydra/launcher=slurm_local", "method=supervised", "student=mlp", "seed=0,1", "hydra.sweep.dir=s",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in summary_rows(tmp_path / "s")] == ["ok", "ok"]


def test_an_optuna_search_over_the_students_schedule_trains_the_teacher_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = kdrun("hparams_search=kd_optuna", "hydra.sweeper.n_trials=3", "dataset=digits", "teacher=mlp",
                 "student=mlp", "schedule.epochs=2", "hydra.sweep.dir=s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in summary_rows(tmp_path / "s")] == ["ok"] * 3
    assert proc.stdout.count("teacher: none given") == 1 and proc.stdout.count("teacher: reusing") == 2


def test_an_optuna_search_without_validation_images_is_refused(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = kdrun("hparams_search=kd_optuna", "hydra.sweeper.n_trials=1", "dataset=digits", "dataset.val_size=null",
                 "hydra.sweep.dir=s", cwd=tmp_path)
    assert proc.returncode != 0 and "hold validation images out with dataset.val_size" in proc.stderr
    assert not list((tmp_path / "s").glob("*/summary.json")) and not list((tmp_path / "s").glob("*/checkpoints"))


def _installed(command):
    """The console script pip installed beside this Python (the package's entry point)."""
    path = Path(sys.executable).with_name(command)
    if not path.is_file():
        pytest.skip(f"{command} is not installed beside {sys.executable}; pip install -e .")
    return str(path)


def test_kdrun_table_is_installed_and_matches_the_script(sweep):
    args = [str(sweep[0]), "--rows", "method", "--cols", "student.name"]
    installed = subprocess.run([_installed("kdrun-table"), *args], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout == script("make_table.py", *args).stdout and "| kd | " in installed.stdout


def test_kdrun_plot_draws_a_curve_per_setting_with_the_mean_over_seeds(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from kdrun.tools import plot

    out = tmp_path / "runs.png"
    proc = subprocess.run([_installed("kdrun-plot"), str(sweep[0]), "-o", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 curves" in proc.stdout  # kd and supervised, 2 seeds each
    groups = plot.groups(plot.find_runs([str(sweep[0])]))
    kd = next(members for members in groups.values() if members[0].method == "kd")
    assert len(kd) == 2
    finals = []
    for run in kd:  # the last test accuracy of each seed, read here from metrics.jsonl
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        finals.append([r["test/acc"] for r in rows if "test/acc" in r][-1])
    epochs, means, stds = plot.mean_std(kd, "test/acc")
    assert means[-1] == pytest.approx(statistics.fmean(finals)) and stds[-1] == pytest.approx(statistics.stdev(finals))
