"""The `kdrun` command: Hydra composes the config, `kdrun.run` does the work."""

import signal
import sys
import textwrap
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict


HELP_WIDTH = 100


def entry() -> None:
    """The `kdrun` console command: `kdrun --version` prints kdrun's version (Hydra owns the rest of the command
    line and knows no such flag); anything else goes to Hydra and `main`."""
    if "--version" in sys.argv[1:]:
        print(f"kdrun {version()}")
        return
    main()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("kdrun")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from kdrun import __version__

        return __version__


def config_groups(width: int = HELP_WIDTH) -> str:
    """`kdrun --help`'s list of config groups and their options (conf/), without private presets (names starting
    with `_`, which other presets include), wrapped to `width` columns."""
    root = files("kdrun.conf")
    groups: dict[str, list[str]] = {}

    def walk(folder, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            hidden = entry.name.startswith(("_", ".")) or (prefix == "" and entry.name == "hydra")
            if entry.is_dir() and not hidden:
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml") and not entry.name.startswith("_") and prefix:
                groups.setdefault(prefix[:-1], []).append(entry.name[:-5])

    walk(root, "")
    return "\n".join(textwrap.fill(", ".join(options), width, initial_indent=f"{group}: ", subsequent_indent="    ",
                                   break_on_hyphens=False) for group, options in sorted(groups.items()))


OmegaConf.register_new_resolver("kdrun_config_groups", lambda: config_groups(), replace=True)  # conf/hydra/help


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job; returns its validation accuracy when it holds validation images out, else its test accuracy
    (what a sweeper maximises: an Optuna search must have a validation split). In a sweep, a failing job is
    recorded (its run dir's error.txt, the sweep summary) and returns NaN, so the sweep goes on and an Optuna
    search marks the trial failed."""
    from kdrun.engine import Interrupted  # heavy imports after Hydra has handled --help / --cfg
    from kdrun import rundir
    from kdrun.errors import KdrunError, write_error
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
    except KeyboardInterrupt:  # Ctrl-C before training (in training it stops with a checkpoint, as above)
        if sweep:
            raise
        rundir.restore(hc.runtime.output_dir)
        print("kdrun: stopped by SIGINT before training began; nothing to continue", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        if isinstance(e, OSError) and write_error(e) is not None:
            e = write_error(e)  # a full disk, a read-only folder: one sentence
        if not (sweep or isinstance(e, KdrunError)):
            raise
        print(f"kdrun: error: {e}", file=sys.stderr)
        if not sweep:
            rundir.restore(hc.runtime.output_dir)  # a run refused before it trained leaves its run dir as it was
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
