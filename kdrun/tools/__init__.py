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
