"""A run dir belongs to one run, and a command refused before it trains leaves it as it found it.

Hydra writes `.hydra/{config,hydra,overrides}.yaml` and opens the job log (`<job name>.log`) before kdrun sees
the config. `RunDirGuard`, a Hydra callback (conf/config.yaml), notes what the run dir held when the command
started; on a user error `restore` puts it back: a fresh run dir is removed, an existing one gets its Hydra
files and its job log back, unless the command trained (changed a file that was there, or wrote a checkpoint).
`lock` keeps a second process out of a run dir in use. Sweeps keep their failure records (`kdrun.sweep`).

Light on purpose (no torch): Hydra instantiates the callback before every run.
"""

import contextlib
import errno
import fcntl
import inspect
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun.errors import KdrunError, write_error

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# What may change between the sessions of one run: where and how it logs (the logger, the log and checkpoint
# intervals), on what hardware (device, loader workers; not the number of ranks, which changes the arithmetic),
# how it was started (resume) and where its files live (paths: a moved data or cache dir). Everything else
# decides what the run computes.
NOT_IDENTITY = ("logger", "resume", "trainer.device", "trainer.num_workers", "trainer.log_every",
                "trainer.checkpoint_every_steps")  # and `paths`, each replaced by a placeholder (see `identity`)

_before: dict | None = None  # what the run dir held when this command started (`RunDirGuard`)


class RunDirGuard(Callback):
    """Notes what `hydra.run.dir` holds before Hydra writes into it (a single run; not a sweep's jobs)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _before
        hydra = config.hydra
        _before = snapshot(Path(hydra.run.dir), hydra.job.name, hydra.output_subdir)
        blocked = _unwritable(_before)
        if blocked is not None:  # else Hydra fails writing its files, with a traceback
            print(f"kdrun: error: {write_error(PermissionError(errno.EACCES, 'Permission denied', str(blocked)))}",
                  file=sys.stderr)
            sys.exit(1)


def _listing(run_dir: Path) -> dict[str, tuple[int, int] | None]:
    """Everything under `run_dir`: each file's size and modification time, each folder (None)."""
    out = {}
    for root, dirs, names in os.walk(run_dir):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), run_dir)] = None
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), run_dir)] = (st.st_size, st.st_mtime_ns)
    return out


def snapshot(run_dir: Path, job_name: str, output_subdir: str | None) -> dict:
    """What `restore` needs to put `run_dir` back: whether it existed, which of its parents this command will
    create, the bytes of Hydra's files, the length of the job log and the listing of everything else."""
    run_dir = run_dir.absolute()
    hydra_files = [run_dir / output_subdir / n for n in HYDRA_FILES] if output_subdir else []
    log_file = run_dir / f"{job_name}.log"
    state = {"run_dir": run_dir, "hydra": {}, "log": (log_file, None), "listing": None, "created": None}
    if not run_dir.exists():
        created = run_dir
        while not created.parent.exists():
            created = created.parent
        state["created"] = created
        return state
    state["hydra"] = {p: p.read_bytes() if p.is_file() else None for p in hydra_files}
    state["log"] = (log_file, log_file.stat().st_size if log_file.is_file() else None)
    state["listing"] = _listing(run_dir)
    return state


def _unwritable(before: dict) -> Path | None:
    """The first of the run dir's files and folders Hydra writes to (or the folder it creates the run dir in)
    that this process may not write, if any."""
    existing = before["run_dir"]
    while not existing.exists():
        existing = existing.parent
    paths = [*before["hydra"], before["log"][0], *{p.parent for p in before["hydra"]}, existing]
    return next((p for p in paths if p.exists() and not os.access(p, os.W_OK)), None)


def restore(run_dir: str | Path) -> bool:
    """After a user error, put `run_dir` back as `RunDirGuard` found it, unless this command trained in it
    (changed a file that was there, or wrote a checkpoint). True when it did."""
    before = _before
    if before is None or before["run_dir"] != Path(run_dir).absolute() or not before["run_dir"].is_dir():
        return False
    run_dir = before["run_dir"]
    ours = set(before["hydra"]) | {before["log"][0]}  # what Hydra wrote before kdrun ran
    now = {k: v for k, v in _listing(run_dir).items() if run_dir / k not in ours}
    old = {k: v for k, v in (before["listing"] or {}).items() if run_dir / k not in ours}
    if any(now.get(k) != v for k, v in old.items()) or any(  # also a nested run's (an active-learning round's)
            "checkpoints" in Path(k).parts[:-1] for k in set(now) - set(old)):
        return False
    if before["created"] is not None:  # a fresh run dir: remove it, and the parents this command made
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        while parent.is_relative_to(before["created"]):
            try:
                parent.rmdir()  # only when empty: another run may have made a sibling meanwhile
            except OSError:
                break
            parent = parent.parent
        return True
    for path, data in before["hydra"].items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)
    log_file, size = before["log"]
    if size is None:
        log_file.unlink(missing_ok=True)
    elif log_file.is_file():
        os.truncate(log_file, size)
    for k in sorted(set(now) - set(old), reverse=True):  # what this command created, contents before folders
        with contextlib.suppress(OSError):
            if now[k] is None:
                (run_dir / k).rmdir()
            else:
                (run_dir / k).unlink()
    return True


def identity(cfg: DictConfig) -> dict:
    """The resolved config of a run less `NOT_IDENTITY`, flat (`{"method.temperature": 4.0, ...}`): what
    checkpoints/last.pt records, and what a session that continues the run must have."""
    cfg = cfg.copy()
    with open_dict(cfg):
        if "paths" in cfg:  # the same placeholder in every session, so `${paths.data_dir}/x` compares equal
            cfg.paths = {k: f"<paths.{k}>" for k in cfg.paths}
        for key in NOT_IDENTITY:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and leaf in node:
                del node[leaf]
    return _flat(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_same_run(cfg: DictConfig, run_dir: str | Path) -> None:
    """Refuse to continue `run_dir`'s checkpoints/last.pt with a config other than the one that wrote it: one
    sentence naming the first keys that differ. A last.pt from before kdrun recorded its config passes, and so does
    one from before a field existed when this session leaves that field unset (null or empty) or, for a method
    field, at its method's default (DFAD's balance_weight 0): either changes nothing."""
    from kdrun import checkpoint  # torch: not for the callback above

    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return
    saved = checkpoint.load(last).get("config")
    if saved is None:
        return
    mine = identity(cfg)
    differ = [k for k in dict.fromkeys([*saved, *mine]) if saved.get(k, "<unset>") != mine.get(k, "<unset>")
              and not (k not in saved and _changes_nothing(cfg, k, mine[k]))]
    if differ:
        shown = ", ".join(f"{k}={mine.get(k, '<unset>')} (the run dir has {saved.get(k, '<unset>')})"
                          for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise KdrunError(f"{run_dir} holds another run, which this command would continue with {shown}{more}; give "
                         "this run a fresh hydra.run.dir, or repeat that run's own command to continue it")


def _changes_nothing(cfg: DictConfig, key: str, value) -> bool:
    """Whether field `key` at `value` is as if it did not exist: unset, or a method field at its default."""
    if value in (None, [], {}):
        return True
    if not key.startswith("method.") or not OmegaConf.select(cfg, "method._target_"):
        return False
    param = inspect.signature(get_class(cfg.method._target_)).parameters.get(key.removeprefix("method."))
    return param is not None and param.default is not inspect.Parameter.empty and param.default == value


@contextlib.contextmanager
def lock(run_dir: str | Path):
    """Hold `run_dir` for this process (an advisory lock on the folder itself, so nothing is written in it);
    a second process that asks for it meanwhile is refused with one sentence."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdrunError(f"another kdrun process is running in {run_dir}; wait for it to end, or give this run "
                             "its own hydra.run.dir") from None
        yield
    finally:
        os.close(fd)
