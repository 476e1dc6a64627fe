"""The processes of a tensor-parallel server (`--tensor-parallel-size N`): started here, as vLLM does, no torchrun.

The server process is rank 0: it spawns ranks 1..N-1 (multiprocessing, spawn), each with a pipe from rank 0.
Every rank joins one torch.distributed group (NCCL, one GPU a rank, cuda:RANK, on CUDA; gloo on a CPU; rank 0
hosts the rendezvous on a free local port) and loads the model with transformers' tensor-parallel plan. Rank 0
then serves; the others repeat its device work (app/model/compute/parallel.py) until it closes their pipes.

A rank that exits while the server runs stops it: rank 0 watches the followers' processes and, when one ends,
logs which and with what code and turns `lost`, which the server reads to exit non-zero; a process still alive
`EXIT_GRACE_S` later (a collective that never returns) exits at once. A follower whose rank 0 is gone reads
the end of its pipe and exits. Collectives time out after `COLLECTIVE_TIMEOUT` while loading (ranks load at
their own pace), then after --tensor-parallel-timeout-s (serving, the ranks meet in every collective: a longer
wait is a rank hung, or one that failed alone). `lose` tells whoever `on_lost` registered (the lifecycle:
/ready answers 503 at once) before the server stops.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from app.config import Settings
from app.model.compute.loader import LoadedModel, load_model, resolve_device, resolve_model_path
from app.model.compute.parallel import Followers, follow, follower_generator

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a rank waits in a collective (the rendezvous and the model load included) before it fails."""
EXIT_GRACE_S = 30.0
"""How long rank 0 may take to stop once a rank is lost before it exits at once."""


class Ranks:
    """Rank 0's view of a tensor-parallel server: the followers it started and whether one was lost."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.size = settings.tensor_parallel_size
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.lost: str | None = None
        """Why the server must stop (a rank exited, or the ranks fell out of step); None while all is well."""
        self._stopping = threading.Event()
        self._listeners: list[Callable[[str], None]] = []
        resolve_model_path(settings)  # `--model tiny` is built once, here, not by every rank at once
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[BaseProcess] = []
        for rank in range(1, self.size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_follower, args=(settings, rank, self.address, theirs), name=f"voxtral-rank-{rank}", daemon=True
            )
            process.start()
            theirs.close()
            log.info("tensor-parallel rank %d started (pid %s)", rank, process.pid)
            self._pipes.append(ours)
            self._processes.append(process)
        threading.Thread(target=self._watch, name="voxtral-ranks-watch", daemon=True).start()

    def load(self, settings: Settings) -> LoadedModel:
        """Rank 0's load: join the group, load its shard, hold the pipes to the followers."""
        _join(settings, 0, self.address)
        loaded = load_model(settings)
        _serving_timeout(settings)
        followers = Followers(self._pipes, dist.group.WORLD, self.lose, settings.tensor_parallel_timeout_s)
        return replace(loaded, followers=followers)

    def on_lost(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` (from any thread) when the ranks are lost; at once if they are already."""
        self._listeners.append(listener)
        if self.lost is not None:
            listener(self.lost)

    def lose(self, reason: str) -> None:
        """The server can go on no more: the listeners are told, and it exits non-zero (at once after
        `EXIT_GRACE_S`)."""
        if self.lost is None and not self._stopping.is_set():
            self.lost = reason
            for listener in self._listeners:
                listener(reason)
            threading.Timer(EXIT_GRACE_S, _exit_now, args=(reason,)).start()

    def stop(self) -> None:
        """Close the followers' pipes (they exit) and wait for them a while; then end them."""
        self._stopping.set()
        for pipe in self._pipes:
            pipe.close()
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()

    def _watch(self) -> None:
        sentinels = {process.sentinel: rank for rank, process in enumerate(self._processes, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping.is_set():
            return
        rank = sentinels[ready[0]]  # type: ignore[index]
        process = self._processes[rank - 1]
        process.join(1)
        reason = f"tensor-parallel rank {rank} exited with code {process.exitcode}"
        log.critical("%s: stopping the server", reason)
        self.lose(reason)


def _exit_now(reason: str) -> None:
    log.critical("%s: the server did not stop within %g s; exiting now", reason, EXIT_GRACE_S)
    os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _join(settings: Settings, rank: int, address: str) -> None:
    """Join the group as `rank`: NCCL on cuda:RANK, or gloo on a CPU, whose cores the ranks share out."""
    size = settings.tensor_parallel_size
    cuda = resolve_device(settings.device).startswith("cuda")
    os.environ["LOCAL_RANK"] = str(rank)  # where transformers puts this rank's shard
    if cuda:
        torch.cuda.set_device(rank)
    elif settings.torch_threads == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def _serving_timeout(settings: Settings) -> None:
    """Wait for every rank to have loaded (under the loading timeout), then shorten the group's: the ranks now
    meet in every collective, so one that waits longer than --tensor-parallel-timeout-s fails (an error here,
    answered to rank 0; NCCL's watchdog ends the process) instead of waiting 10 minutes. torch has no public
    setter for a live group's timeout; `_set_pg_timeout` is its own (gloo and NCCL)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    dist.barrier()
    _set_pg_timeout(datetime.timedelta(seconds=settings.tensor_parallel_timeout_s), dist.group.WORLD)


def _follower(settings: Settings, rank: int, address: str, pipe: Connection) -> None:
    """Rank `rank`'s process: load the shard, build the generator rank 0 describes, repeat its work."""
    from app.logs import configure_logging
    from app.model.runtime import log_mel_of

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl+C drains rank 0, which then ends this
    configure_logging(settings)
    try:
        _join(settings, rank, address)
        loaded = load_model(settings)
        _serving_timeout(settings)
        start = pipe.recv()
        generator = follower_generator(loaded.model, log_mel_of(loaded), start, dist.group.WORLD)
        follow(generator, pipe)
    except EOFError:  # rank 0 exited before sending anything
        pass
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
