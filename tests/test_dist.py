"""Data parallelism: ranks take their slices of one process's batches; torchrun starts ranks too.
(kdrun's own spawning of ranks is tested in test_long_runs.py.)"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import one_thread_env
from kdrun.data.loaders import BatchAugment, FolderLoader, Normalize, TensorLoader
from kdrun.data.sources import digits

RUN = ["dataset=digits", "logger=none", "method=kd", "teacher=mlp", "student=mlp", "schedule.epochs=3",
       "schedule.batch_size=32", "trainer.device=cpu"]


@pytest.mark.slow
def test_torchrun_with_a_shared_run_dir_trains_as_one_process(tmp_path):
    def run(*launcher, run_dir):
        proc = subprocess.run([sys.executable, *launcher, *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                              env=one_thread_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads((run_dir / "summary.json").read_text())

    one = run("-m", "kdrun", run_dir=tmp_path / "one")
    two = run("-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "kdrun", run_dir=tmp_path / "two")
    assert two["steps"] == one["steps"] and two["test/acc"] == pytest.approx(one["test/acc"], abs=0.01)


def test_tensor_loader_ranks_split_the_batches_of_one_process():
    d = digits()
    norm = Normalize([0.3], [0.4], "cpu")

    def batches(rank=0, world=1, **kw):
        loader = TensorLoader(d.train, 64, norm, "cpu", seed=3, rank=rank, world_size=world, **kw)
        return list(loader)

    train = {"shuffle": True, "drop_last": True, "augment": BatchAugment(1, True)}
    whole, parts = batches(**train), [batches(r, 2, **train) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1])
    for b, p0, p1 in zip(whole, *parts):
        for k in b:
            assert torch.equal(b[k], torch.cat([p0[k], p1[k]]))
    test = [batches(r, 3) for r in range(3)]  # uneven shards of the last batch still cover the split once
    assert sorted(torch.cat([b["index"] for part in test for b in part]).tolist()) == list(range(len(d.train)))


def test_folder_loader_ranks_take_their_part_of_one_shared_order():
    data = torch.utils.data.TensorDataset(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.zeros(50, dtype=torch.long))

    def indices(rank=0, world=1):
        loader = FolderLoader(data, lambda x: x, 10, Normalize([0.0], [1.0], "cpu"), "cpu", shuffle=True,
                              drop_last=True, seed=1, rank=rank, world_size=world)
        return [b["index"] for b in loader]

    whole, parts = indices(), [indices(r, 2) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 5
    for w, p0, p1 in zip(whole, *parts):
        assert torch.equal(w, torch.cat([p0, p1]))
