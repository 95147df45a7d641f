import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from kdrun.data.sources import DEBIAN_FASHION_MNIST


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory):
    """Every test (and every `kdrun` it starts) uses fresh data/cache dirs and no W&B network."""
    root = tmp_path_factory.mktemp("kdrun")
    os.environ["KDRUN_DATA_DIR"] = str(root / "data")
    os.environ["KDRUN_CACHE_DIR"] = str(root / "cache")
    os.environ["WANDB_MODE"] = "disabled"
    return root


def make_cfg(*overrides: str, tmp_path: Path | None = None):
    """The composed config, as `kdrun OVERRIDES` would see it (Hydra's runtime paths set by hand)."""
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run far faster on one thread than on threads that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread_env() -> dict:
    """A `kdrun` subprocess's environment: one thread (the CPU is shared) and the session's data and cache dirs
    (read at call time: a test module is imported before the session fixture sets them)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def kdrun(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `kdrun` command line as a user does; returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not on disk: apt-get install dataset-fashion-mnist",
)


def preempted(method_cls):
    """`method_cls` with a `stop_at` argument: it sends itself SIGTERM at that training step, as a preemption."""

    class Preempted(method_cls):
        def __init__(self, *args, stop_at=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.stop_at, self.steps = stop_at, 0

        def training_step(self, batch):
            self.steps += 1
            if self.steps == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch)

    return Preempted
