"""Commands around finished runs, one module each: `kdrun-eval` (a checkpoint's accuracy, per class, and confusion
matrix on a dataset), `kdrun-export` (a checkpoint as ONNX, TorchScript or safetensors, with its preprocessing),
`kdrun-table` and `kdrun-plot`; and the small helpers they share."""

import contextlib
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def atomic(path: Path):
    """A temporary path beside `path` to write to, moved onto `path` when the block succeeds (a reader sees the
    old file or the new one, never half of one) and removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fail(command: str, error: Exception) -> None:
    """Print a user's mistake as `kdrun` does (one line, no traceback) and exit with status 1."""
    print(f"{command}: error: {error}", file=sys.stderr)
    sys.exit(1)


def checkpoint_command(command: str, cfg, work, format_report) -> None:
    """The body of a command on one checkpoint (`cfg.ckpt_path`): `work(cfg, out_dir)` (out_dir: Hydra's output dir
    of this command) gives a report, printed with `format_report(report, out_dir)`; a mistake is one line (`fail`)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from kdrun.errors import KdrunError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise KdrunError("no checkpoint given; name one with ckpt_path=RUN/checkpoints/best.pt")
        report = work(cfg, out_dir)
    except KdrunError as e:
        fail(command, e)
    print(format_report(report, out_dir))
