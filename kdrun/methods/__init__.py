"""One file per method; the `method` config group selects a class here by `_target_`."""

from kdrun.methods.base import Method, Stage

__all__ = ["Method", "Stage"]
