"""The `kdrun` command: Hydra composes the config, `kdrun.run` does the work."""

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job; returns its validation accuracy when it holds validation images out, else its test accuracy
    (what a sweeper maximises: an Optuna search must have a validation split). In a sweep, a failing job is
    recorded (its run dir's error.txt, the sweep summary) and returns NaN, so the sweep goes on and an Optuna
    search marks the trial failed."""
    from kdrun.engine import Interrupted  # heavy imports after Hydra has handled --help / --cfg
    from kdrun.errors import KdrunError
    from kdrun.run import format_summary, run
    from kdrun.sweep import record_failure

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        if "optuna" in str(hc.sweeper.get("_target_", "")).lower() and cfg.dataset.get("val_size") is None:
            raise KdrunError("an Optuna search chooses by the jobs' validation accuracy, and the test set must not "
                             "choose; hold validation images out with dataset.val_size=N (or a fraction such as 0.1)")
        if cfg.resume and not (run_dir / "checkpoints" / "last.pt").is_file():
            run_dir = _unfinished_run(cfg, hc)
        _name_wandb_run(cfg, hc, sweep)
        summary = run(cfg, run_dir, method_name=hc.runtime.choices.get("method"),
                      log_config=OmegaConf.to_container(hc.job_logging, resolve=True))
    except Interrupted as e:
        where = f"{e.path} holds step {e.step}" if e.path else f"stopped at step {e.step}"
        print(f"kdrun: stopped by {signal.Signals(e.signum).name}; {where}; run the same command with "
              f"hydra.run.dir={run_dir} to continue", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        if not (sweep or isinstance(e, KdrunError)):
            raise
        print(f"kdrun: error: {e}", file=sys.stderr)
        if not sweep:
            sys.exit(1)
        record_failure(run_dir, e, user_error=isinstance(e, KdrunError))
        return float("nan")
    if summary is None:  # a rank other than 0 under torchrun
        return None
    print(format_summary(summary, run_dir))
    return summary.get("val/acc", summary["test/acc"])


def _unfinished_run(cfg: DictConfig, hc) -> Path:
    """`resume=true`: the newest run dir of this same command that has a last.pt and no summary.json."""
    from kdrun.errors import KdrunError

    mine = sorted(o for o in hc.overrides.task if not o.startswith("resume="))
    candidates = []
    for f in Path(cfg.paths.output_dir).glob("**/.hydra/overrides.yaml"):
        run_dir = f.parent.parent
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file() and not (run_dir / "summary.json").exists():
            if sorted(o for o in OmegaConf.load(f) if not o.startswith("resume=")) == mine:
                candidates.append((last.stat().st_mtime, run_dir))
    if not candidates:
        raise KdrunError(f"resume=true but no unfinished run of this command is under {cfg.paths.output_dir}; "
                         "give the run's directory with hydra.run.dir=DIR")
    return max(candidates)[1]


def _name_wandb_run(cfg: DictConfig, hc, sweep: bool) -> None:
    """W&B: the jobs of a sweep share a group named after the sweep dir; a run's overrides are its tags."""
    if cfg.logger.get("backend") != "wandb":
        return
    with open_dict(cfg):
        if sweep and not cfg.logger.group:
            cfg.logger.group = "-".join(Path(hc.sweep.dir).parts[-2:])
        cfg.logger.tags = [*cfg.logger.tags, *hc.overrides.task]
