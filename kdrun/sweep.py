"""Sweeps (`kdrun -m ...`): a failed job leaves its error in its run dir and the others go on; when
the sweep ends, `sweep_summary.csv` in the sweep dir lists every job.

Light on purpose (no torch): Hydra instantiates the callback before every run.
"""

import csv
import json
import logging
import sys
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "status", "val/acc", "test/acc", "test/acc_best", "wall_s", "run_dir", "error"]


def record_failure(run_dir: str | Path, error: BaseException, user_error: bool) -> str:
    """Write `error.txt` in the job's run dir (the message of a user error, else the traceback);
    returns the message's first line."""
    text = str(error) if user_error else "".join(traceback.format_exception(error))
    Path(run_dir, "error.txt").write_text(text.rstrip() + "\n")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def job_row(run_dir: Path, sweep_dir: Path) -> dict:
    """One row of the sweep summary for a job's run dir (named relative to the sweep dir)."""
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
    row = {"job": hydra.job.num, "overrides": " ".join(hydra.overrides.task), "run_dir": str(run_dir.relative_to(sweep_dir))}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(status="ok", **{k: summary.get(k) for k in ("val/acc", "test/acc", "test/acc_best", "wall_s")})
    elif (run_dir / "error.txt").is_file():
        row.update(status="failed", error=(run_dir / "error.txt").read_text().strip().splitlines()[-1])
    else:
        row.update(status="unfinished")  # killed, or stopped by a signal: rerun with the same sweep dir to continue
    return row


def wandb_sync_command(sweep_dir: Path, cache_dir: Path) -> str | None:
    """One `wandb sync` command for the sweep's offline W&B runs not yet uploaded: its jobs' (a pattern) and
    those of the teachers it trained (in the teacher cache, written since the sweep began); None if there are none."""
    def unsynced(pattern: str, root: Path) -> list[Path]:
        return [d for d in sorted(root.glob(pattern)) if not list(d.glob("*.wandb.synced"))]

    jobs = unsynced("*/wandb/offline-run-*", sweep_dir)
    start = min((p.stat().st_mtime for p in sweep_dir.glob("*/.hydra")), default=0.0)
    teachers = [d for d in unsynced("teachers/*/wandb/offline-run-*", cache_dir) if d.stat().st_mtime >= start]
    if not jobs and not teachers:
        return None
    patterns = [f"{sweep_dir.absolute()}/*/wandb/offline-run-*"] if jobs else []
    return " ".join(["wandb sync", *patterns, *map(str, teachers)])


class SweepSummary(Callback):
    """Writes `sweep_summary.csv` (one row per job: overrides, status, test/acc, wall_s...) when a sweep
    ends, and makes the command fail when a job did. Configured under `hydra.callbacks`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sorted((job_row(p.parent.parent, sweep_dir) for p in sweep_dir.glob("**/.hydra/hydra.yaml")),
                      key=lambda r: r["job"])
        path = sweep_dir / "sweep_summary.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        bad = [r for r in rows if r["status"] != "ok"]
        log.info("sweep: %d of %d jobs finished; summary in %s", len(rows) - len(bad), len(rows), path)
        sync = wandb_sync_command(sweep_dir, Path(config.paths.cache_dir).expanduser())
        if sync:
            print(f"kdrun: the sweep's W&B runs were logged offline; upload them all with:\n  {sync}", file=sys.stderr)
        if bad:
            for r in bad:
                print(f"kdrun: job {r['job']} ({r['overrides']}) {r['status']}: {r.get('error', '')}", file=sys.stderr)
            print(f"kdrun: {len(bad)} of {len(rows)} jobs did not finish; see {path}", file=sys.stderr)
            sys.exit(1)
