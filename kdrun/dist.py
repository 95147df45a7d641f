"""Several processes training one run: data parallelism without wrapping the model.

Every rank holds the whole method, starts from rank 0's weights, trains on its slice of each global
batch, and averages its gradients with the others after every backward (one flat all-reduce per
optimizer step), so every parameter an optimizer sees, in the student or in a method's own modules,
stays identical on every rank. Not wrapping the student in DistributedDataParallel keeps its module
paths (forward hooks) and state-dict keys what they are in a single process. Only rank 0 writes.

Two ways in: `kdrun trainer.devices=N` spawns the N ranks itself once Hydra has composed the config
(`launch`), and `torchrun --nproc_per_node=N -m kdrun ... hydra.run.dir=DIR` starts them from outside;
both leave the ranks with torchrun's environment (RANK, WORLD_SIZE, ...), read by `process_group`.
"""

import contextlib
import logging
import logging.config
import os
import signal
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Rank 0 may train the teacher while the other ranks wait for it at a barrier.
TIMEOUT = timedelta(hours=12)


def launched() -> bool:
    """Whether this process is one rank of several (started by `launch` or by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@contextlib.contextmanager
def process_group(device: torch.device):
    """Join the ranks' process group (NCCL on CUDA, gloo on the CPU) when there are several; yields the
    device of this rank (cuda:LOCAL_RANK for a CUDA device)."""
    if not launched():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        yield device
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block before the others (a download, a teacher to train and cache), which then
    find its results on disk."""
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0 and is_distributed():
        dist.barrier()


def all_same(value) -> bool:
    """Whether every rank holds the same `value` (e.g. its run dir)."""
    if not is_distributed():
        return True
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return all(v == value for v in values)


def broadcast(tensors) -> None:
    """Overwrite `tensors` with rank 0's, in place."""
    for t in tensors:
        dist.broadcast(t.data, src=0)


def all_reduce_mean(tensors) -> None:
    """Average `tensors` over the ranks, in place, with one all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world_size()
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def launch(fn, nprocs: int, *args, log_config: dict | None = None) -> None:
    """Run `fn(*args)` in `nprocs` fresh processes that form one process group on this machine.

    SIGTERM/SIGUSR1/SIGINT sent to this process are passed on to the ranks (which checkpoint and stop); an
    exception raised by a rank is raised here.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(_rank_main, args=(nprocs, _free_port(), fn, args, log_config, errors), nprocs=nprocs,
                               join=False, start_method="spawn")

    def forward(signum, _frame):
        for p in procs.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    main_thread = threading.current_thread() is threading.main_thread()  # where Python lets handlers be set
    stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # kdrun.engine.STOP_SIGNALS, for `kill -INT` too
    previous = {s: signal.signal(s, forward) for s in stops} if main_thread else {}
    try:
        while not procs.join(grace_period=30):
            pass
    except mp.ProcessExitedException:
        failures = dict(errors.get() for _ in range(nprocs) if not errors.empty())
        if failures:  # rank 0's own error first: the others often only saw it leave
            raise failures.get(0, next(iter(failures.values()))) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _rank_main(local_rank: int, nprocs: int, port: int, fn, args, log_config, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nprocs), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nprocs))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))  # the ranks share this machine's cores
    if log_config:
        logging.config.dictConfig(log_config)
    try:
        fn(*args)
    except Exception as e:  # handed to the launching process, which reports it as a one-rank run would
        try:
            errors.put((local_rank, e))
        except Exception:  # an exception that does not pickle
            errors.put((local_rank, RuntimeError(f"rank {local_rank}: {e!r}")))
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
