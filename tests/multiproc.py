"""Run a function on N real gloo ranks, each in a fresh process, and collect what each returns.

Used by every multi-process test: results are compared against a single-process reference.
The function must live at module level (it is pickled by reference for ``spawn``).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable


def _entry(fn: Callable, rank: int, world_size: int, init_file: str, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        dist.barrier()
        # Plain bytes: tensors put on a queue travel as shared-memory handles that die with this process.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = 300.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size-1, ...)]`` computed on real gloo ranks."""
    import torch

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outs: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout_s)
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                outs[rank] = torch.load(io.BytesIO(value), weights_only=False)
        except queue.Empty:
            raise TimeoutError(f"ranks did not finish within {timeout_s}s (a collective hang?)") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [outs[r] for r in range(world_size)]
