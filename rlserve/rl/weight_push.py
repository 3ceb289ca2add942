"""How server mode hands the policy's weights to the rollout servers (`rollout.weight_sync`):

- tensor: `Client.update_weights_from_tensor` (CPU tensors as shared memory, CUDA tensors as IPC
  handles; trainer and servers on one host), in calls of at most `bucket_bytes`;
- disk: a safetensors directory in a temporary folder, loaded by `/update_weights_from_disk`;
- distributed: one torch.distributed weight-update group for the whole run, the trainer rank 0 and
  server i rank i + 1 (`rlserve.weight_sync.group.WeightSender`); each push is one
  `/update_weights_from_distributed` announcement per server while the trainer broadcasts the
  parameters in flattened buckets of at most `bucket_bytes`.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlparse

import torch

from rlserve.client import Client
from rlserve.llm import LLM
from rlserve.net import free_port

log = logging.getLogger("rlserve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def named_parameters(llm: LLM) -> list[tuple[str, torch.Tensor]]:
    # detached views: every path copies them (or has sent them) before its call returns
    return [(n, p.detach()) for n, p in llm.engine.model.named_parameters()]


def resolve_backend(backend: str, device: torch.device | None) -> str:
    """auto: NCCL when the policy is on CUDA, gloo otherwise."""
    if backend != "auto":
        return backend
    return "nccl" if device is not None and device.type == "cuda" else "gloo"


def master_address(urls: list[str]) -> str:
    """The address the servers reach the trainer's store at: loopback when every server is local, else
    this host's address on the route to the first server."""
    hosts = [urlparse(u).hostname or "127.0.0.1" for u in urls]
    if all(h in LOOPBACK for h in hosts):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(hosts[0]), 9))    # a UDP connect sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def alongside(requests: list[Callable[[], Any]], work: Callable[[], Any]) -> list[Any]:
    """Run each request in a thread while `work()` runs here (both ends of a collective block until the
    other arrives); return the requests' answers. A failed request is raised before a failure of `work`,
    since a server that refused is the cause of the rendezvous the trainer then waits out."""
    answers: list[Any] = [None] * len(requests)
    errors: list[BaseException | None] = [None] * len(requests)

    def call(i: int) -> None:
        try:
            answers[i] = requests[i]()
        except BaseException as e:      # handed to the caller below
            errors[i] = e
    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    work_error: BaseException | None = None
    try:
        work()
    except BaseException as e:
        work_error = e
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None), work_error)
    if first is not None:
        raise first
    return answers


class DistributedPush:
    """The run's weight-update group: created by `connect`, used by every `push`, destroyed by `close`."""

    def __init__(self, clients: list[Client], backend: str, bucket_bytes: int) -> None:
        from rlserve.weight_sync.group import WeightSender

        self.clients = clients
        self.bucket_bytes = bucket_bytes
        address = master_address([c.base_url for c in clients])
        # A name of this run's own: a group a crashed run left on a server cannot collide with it.
        port = free_port(address)
        self.sender = WeightSender(address, port, world_size=1 + len(clients),
                                   group_name=f"rlserve-train-{os.getpid()}-{port}", backend=backend)
        self.connected = False

    def connect(self) -> None:
        """Every server joins at its rank (1, 2, … in the order of the clients) while the trainer joins as 0."""
        s = self.sender
        alongside([partial(c.init_weights_update_group, **s.init_request(r))
                   for r, c in enumerate(self.clients, start=1)], s.init_group)
        self.connected = True

    def push(self, llm: LLM, version: int) -> None:
        pairs = named_parameters(llm)
        meta = self.sender.describe(pairs, self.bucket_bytes)
        alongside([partial(c.announce_distributed_update, weight_version=str(version), **meta)
                   for c in self.clients], partial(self.sender.broadcast, pairs, self.bucket_bytes))

    def close(self) -> None:
        """Each server leaves the group (a server that is gone has none to leave), then the trainer."""
        if self.connected:
            for c in self.clients:
                try:
                    c.destroy_weights_update_group(self.sender.group_name)
                except Exception as e:          # best effort: closing must not hide why the run ended
                    log.warning("could not destroy the weight update group on %s: %s", c.base_url, e)
        self.sender.close()
        self.connected = False


Each = Callable[[Callable[[Client], Any]], list[Any]]     # runs a call on every server at once


def push_tensor(each: Each, llm: LLM, version: int, bucket_bytes: int) -> None:
    pairs = named_parameters(llm)
    each(lambda c: c.update_weights_from_tensor(pairs, weight_version=str(version), bucket_bytes=bucket_bytes))


def push_disk(each: Each, llm: LLM, version: int) -> None:
    from rlserve.rl.export import export_hf

    with tempfile.TemporaryDirectory(prefix="rlserve-weights-") as tmp:
        export_hf(llm, tmp)
        each(lambda c: c.update_weights_from_disk(tmp, weight_version=str(version)))
