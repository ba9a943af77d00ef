"""Run a function on N ranks: our own spawner (``torch.multiprocessing``, forkserver) or under ``torchrun``.

``launch(fn, world_size, args)`` calls ``fn(ctx, *args)`` on every rank with ``torch.distributed``
initialized (NCCL when there is one GPU per rank, else gloo on CPU) and returns the list of per-rank
results (index = rank, tensors moved to CPU). Started by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the
environment), it runs ``fn`` in this process instead and every rank gets the whole list.

Failure never hangs: a rank that raises sends its traceback and the others are terminated at once
(:class:`RankFailedError` names the rank and carries the traceback); a rank that dies without a word
(segfault, OOM kill) is noticed by its exit code; everything else is bounded by ``timeout_s``, which is
also the collectives' timeout inside the ranks.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankContext", "RankFailedError", "launch", "pick_backend", "under_torchrun", "init_from_env"]

# Environment NCCL needs on the lent GPU hosts (NVLink multicast / NVLS must stay off there).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RankFailedError(RuntimeError):
    """A rank raised, died or timed out; ``rank`` and the rank's ``rank_traceback`` say where and why."""

    def __init__(self, rank: int | None, message: str, rank_traceback: str = ""):
        where = "launch" if rank is None else f"rank {rank}"
        super().__init__(f"{where}: {message}" + (f"\n--- traceback of rank {rank} ---\n{rank_traceback}"
                                                   if rank_traceback else ""))
        self.rank = rank
        self.rank_traceback = rank_traceback


@dataclasses.dataclass(frozen=True)
class RankContext:
    """What ``fn`` learns about its rank."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" or "gloo"
    device: torch.device  # cuda:local_rank under NCCL, cpu under gloo

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def pick_backend(world_size: int, backend: str = "auto") -> str:
    """``"nccl"`` when CUDA shows at least ``world_size`` GPUs, else ``"gloo"``; a forced one is checked."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus >= world_size else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'auto', 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(f"backend='nccl' needs {world_size} GPUs (one a rank), {gpus} visible")
    return backend


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _to_cpu(obj: Any) -> Any:
    """Results cross process boundaries: tensors go to CPU (no CUDA IPC), containers recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _setup(rank: int, world: int, local_rank: int, backend: str, init_method: str, timeout_s: float) -> RankContext:
    if backend == "nccl":
        for k, v in NCCL_ENV.items():
            os.environ.setdefault(k, v)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # bind the communicator to this GPU eagerly
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s), **kwargs,
        )
    return RankContext(rank, world, local_rank, backend, device)


def _worker(
    rank: int, world: int, backend: str, init_method: str, timeout_s: float, threads: int,
    fn: Callable[..., Any], args: Sequence[Any], results: Any,
) -> None:
    try:
        if backend == "gloo":
            torch.set_num_threads(threads)  # N ranks share the host's cores; oversubscription is slower
        ctx = _setup(rank, world, rank, backend, init_method, timeout_s)
        # Plain pickle bytes, not tensors: torch's queue pickler passes tensors as shared-memory file
        # descriptors, which vanish if this process exits before the parent has received them.
        out = pickle.dumps(_to_cpu(fn(ctx, *args)))
        results.put(("ok", rank, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put(("err", rank, traceback.format_exc()))
        return
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already sent; teardown noise must not fail the job
        pass


def init_from_env(timeout_s: float = 600.0, backend: str = "auto") -> RankContext:
    """Initialize ``torch.distributed`` from torchrun's environment (idempotent)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    be = ("nccl" if gpus > local_rank else "gloo") if backend == "auto" else backend
    if dist.is_initialized():
        device = torch.device("cuda", local_rank) if be == "nccl" else torch.device("cpu")
        return RankContext(rank, world, local_rank, be, device)
    return _setup(rank, world, local_rank, be, "env://", timeout_s)


def _launch_torchrun(fn: Callable[..., Any], args: Sequence[Any], world_size: int, timeout_s: float,
                     backend: str) -> list[Any]:
    ctx = init_from_env(timeout_s, backend)
    if ctx.world_size != world_size:
        raise RankFailedError(ctx.rank, f"torchrun started {ctx.world_size} ranks but this job needs {world_size}")
    out = _to_cpu(fn(ctx, *args))
    if world_size == 1:
        return [out]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, out)
    return gathered


def _mp_context(fn_module: str) -> Any:
    """A forkserver that has imported torch once: each rank then starts in a fraction of a second instead
    of re-importing torch (seconds on a small CPU). The server never touches CUDA, so CUDA in the ranks is
    safe; where forkserver does not exist, spawn."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    preload = ["torch", "torch.distributed", "nsa_tp.parallel.launch"]
    if fn_module != "__main__":
        preload.append(fn_module)  # honoured when the server starts (the first launch of this process)
    ctx.set_forkserver_preload(preload)
    return ctx


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _wait_for_silent_death(procs: list[Any], got: dict[int, Any], failed: int, grace_s: float = 1.0) -> int | None:
    """A rank other than ``failed`` that exited non-zero without a result, waiting up to ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        for r, p in enumerate(procs):
            if r != failed and r not in got and p.exitcode not in (None, 0):
                return r
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "auto",
    timeout_s: float = 300.0,
) -> list[Any]:
    """``[fn(ctx_0, *args), ..., fn(ctx_{N-1}, *args)]``; see the module docstring.

    ``fn`` must be importable by name (a module-level function): ranks start from a fresh server process.
    Raises :class:`RankFailedError` for the first rank that fails, with its traceback.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    if under_torchrun():
        return _launch_torchrun(fn, args, world_size, timeout_s, backend)
    be = pick_backend(world_size, backend)
    ctx = _mp_context(getattr(fn, "__module__", "__main__"))
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, be, init_method, timeout_s, threads, fn, tuple(args), results),
            daemon=True, name=f"nsa-tp-rank{r}",
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in got and p.exitcode is not None:
                        # It may have put its message just before exiting: drain once more before blaming it.
                        try:
                            status, rank, payload = results.get(timeout=1.0)
                        except queue_mod.Empty:
                            raise RankFailedError(r, f"exited with code {p.exitcode} without a result") from None
                        break
                else:
                    if time.monotonic() > deadline:
                        missing = [r for r in range(world_size) if r not in got]
                        raise RankFailedError(missing[0], f"timed out after {timeout_s:.0f} s (ranks {missing} "
                                                          "still running)")
                    continue
            if status == "err":
                # A rank that died silently makes its peers' collectives fail first; name the dead one.
                dead = _wait_for_silent_death(procs, got, rank)
                if dead is not None:
                    raise RankFailedError(dead, f"exited with code {procs[dead].exitcode} without a result "
                                                f"(rank {rank} then failed: {_last_line(payload)})")
                raise RankFailedError(rank, "raised an exception", payload)
            got[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(got) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        results.close()
    return [got[r] for r in range(world_size)]
