"""Server mode's rollout (`rollout.backend: server`): the trainer keeps the policy; rollouts run on rlserve
servers over HTTP, given by `rollout.server_urls` or, when that is empty, one the trainer launches on a
free loopback port with the model's engine options (and stops at the end).

Before every step's rollout the trainer pauses the servers (in_place), pushes its weights (shared memory /
CUDA IPC, a safetensors directory, or a broadcast in a weight-update group: rl/weight_push.py) tagged with
the step number as the weight version, and continues them. With server_offload the servers release all
their memory after each rollout and take it back around the next push. The rollout then asks the native
/generate route for exactly what the colocated rollout asks the in-process engine (token ids in; n,
temperature, seed per prompt, tempered logprobs), so a step's samples are the same whichever backend drew
them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rlserve.client import DEFAULT_BUCKET_BYTES, Client, ServerError
from rlserve.config import EngineConfig
from rlserve.config_args import engine_flags
from rlserve.llm import LLM
from rlserve.net import free_port
from rlserve.rl.batch import Rollout, pad
from rlserve.rl.config import RolloutSection
from rlserve.rl.rewards import RewardFn, score_batch
from rlserve.rl.weight_push import DistributedPush, push_disk, push_tensor, resolve_backend

STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
GROUP_GRACE_S = 10.0
# What a rollout constraint may hold: the native route's structured-output fields.
CONSTRAINT_KEYS = ("regex", "json_schema", "ebnf")
# SGLang's memory occupation tags: all of a server's GPU memory but its CUDA context.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class LaunchedServer:
    """`python -m rlserve.server` on a free loopback port, in its own process group (so the engine core
    process it starts goes with it)."""

    def __init__(self, config: EngineConfig, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "rlserve.server", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *engine_flags(config)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        # TORCH_NCCL_ASYNC_ERROR_HANDLING=2: a failed NCCL weight broadcast aborts the group's communicator
        # but leaves the process alive (the default, 3, tears the whole server down); an explicit value wins.
        env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)

    def wait_ready(self, client: Client, timeout: float = STARTUP_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the rollout server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                client.health()
                return
            except (httpx.HTTPError, OSError, ServerError):    # not listening, or up and not ready yet
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the rollout server did not start within {timeout:.0f} s:\n{self._tail()}")

    def _tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the server drains and stops its engine process), then SIGKILL to the whole group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The engine core process exits after the front end; whatever of the group outlives a grace
        # period is killed, and stop() returns once the group is empty.
        if not self._group_gone(GROUP_GRACE_S):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._group_gone(GROUP_GRACE_S)
        self._log.close()

    def _group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()          # reaps the leader
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


class RemoteRollout:
    """The servers a run samples from, the weight push (with the servers' memory offload around it) and
    the rollout over /generate."""

    def __init__(self, urls: list[str], weight_sync: str = "tensor", admin_api_key: str | None = None,
                 launched: LaunchedServer | None = None, *, offload: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, backend: str = "gloo") -> None:
        self.clients = [Client(u, admin_api_key=admin_api_key) for u in urls]
        self.weight_sync = weight_sync
        self.launched = launched
        self.offload = offload
        self.bucket_bytes = bucket_bytes
        self.distributed: DistributedPush | None = None
        if weight_sync == "distributed":
            self.distributed = DistributedPush(self.clients, backend, bucket_bytes)

    @classmethod
    def start(cls, cfg: RolloutSection, engine: EngineConfig, log_dir: Path,
              device: torch.device | None = None) -> RemoteRollout:
        """Connect to cfg.server_urls, or launch one server with `engine`'s options; with distributed
        weight sync, form the weight-update group. `device`: the policy's (picks the group's backend)."""
        bad = sorted(set(cfg.constraint or {}) - set(CONSTRAINT_KEYS))
        if bad:
            raise ValueError(f"rollout.constraint keys {', '.join(bad)} have no /generate field; server mode "
                             f"takes {', '.join(CONSTRAINT_KEYS)}")
        key = os.environ.get("RLSERVE_ADMIN_API_KEY")
        server = None if cfg.server_urls else LaunchedServer(engine, log_dir / "rollout-server.log")
        urls = list(cfg.server_urls) if server is None else [server.url]
        try:
            remote = cls(urls, cfg.weight_sync, key, server, offload=cfg.server_offload,
                         bucket_bytes=cfg.weight_sync_bucket_mb << 20,
                         backend=resolve_backend(cfg.weight_sync_backend, device))
        except BaseException:
            if server is not None:
                server.stop()
            raise
        try:
            if server is not None:
                server.wait_ready(remote.clients[0])
            if remote.distributed is not None:
                remote.distributed.connect()
        except BaseException:
            remote.close()
            raise
        return remote

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self.clients]

    def _each(self, fn: Callable[[Client], Any]) -> list[Any]:
        if len(self.clients) == 1:
            return [fn(self.clients[0])]
        with ThreadPoolExecutor(len(self.clients)) as pool:
            return list(pool.map(fn, self.clients))

    @torch.no_grad()
    def push_weights(self, llm: LLM, version: int) -> float:
        """Pause → [offload: resume the weights] → the policy's current weights, tagged `version` →
        [offload: resume KV cache and CUDA graphs] → continue, on every server. Returns the seconds spent
        resuming memory."""
        resumed = 0.0
        self._each(lambda c: c.pause_generation("in_place"))
        try:
            if self.offload:
                if llm.engine.device.type == "cuda":
                    # what the update freed, still cached by this process's allocator, goes back to the GPU
                    torch.cuda.empty_cache()
                start = time.perf_counter()
                self._each(lambda c: c.resume_memory_occupation(["weights"]))
                resumed += time.perf_counter() - start
            if self.distributed is not None:
                self.distributed.push(llm, version)
            elif self.weight_sync == "disk":
                push_disk(self._each, llm, version)
            else:
                push_tensor(self._each, llm, version, self.bucket_bytes)
            if self.offload:
                start = time.perf_counter()
                self._each(lambda c: c.resume_memory_occupation(["kv_cache", "cuda_graph"]))
                resumed += time.perf_counter() - start
        finally:
            self._each(lambda c: c.continue_generation())
        return resumed

    def release_memory(self) -> None:
        """After a rollout (server_offload): every server frees its weights, KV cache and CUDA graphs."""
        self._each(lambda c: c.release_memory_occupation(list(MEMORY_TAGS)))

    def _generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Each prompt's n completions (response items), prompts spread round-robin over the servers."""
        k = len(self.clients)
        shards = [list(range(i, len(prompts), k)) for i in range(k)]

        def one(i: int) -> list[dict[str, Any]]:
            rows = shards[i]
            if not rows:
                return []
            items = self.clients[i].generate(input_ids=[prompts[r] for r in rows],
                                             sampling_params=[params[r] for r in rows], return_logprob=True)
            return items if isinstance(items, list) else [items]
        with ThreadPoolExecutor(k) as pool:
            answers = list(pool.map(one, range(k)))
        out: list[list[dict[str, Any]]] = [[] for _ in prompts]
        for rows, items in zip(shards, answers):
            it = iter(items)           # prompt by prompt, n items each
            for r in rows:
                out[r] = [next(it) for _ in range(params[r]["n"])]
        return out

    def generate_rollout(self, cfg: RolloutSection, prompts: list[list[int]], fields: list[dict[str, Any]],
                         reward_fn: RewardFn, seed: int) -> Rollout:
        """As rollout.generate_rollout, over the servers: the same seeds (prompt i: seed + i·n …), the
        same tempered logprobs, the same Rollout."""
        params = [{"n": cfg.group_size, "temperature": cfg.temperature, "max_new_tokens": cfg.max_tokens,
                   "seed": seed + i * cfg.group_size, "ignore_eos": cfg.ignore_eos, "logprobs_mode": "tempered",
                   **(cfg.constraint or {})} for i in range(len(prompts))]
        answers = self._generate(prompts, params)
        prompt_ids, completion_ids, texts, engine_lps, sample_fields = [], [], [], [], []
        for ids, items, f in zip(prompts, answers, fields):
            for item in items:
                tokens = list(item["output_ids"])
                lps = item["meta_info"]["output_token_logprobs"]
                prompt_ids.append(ids)
                completion_ids.append(tokens)
                texts.append(item["text"])
                engine_lps.append(torch.tensor([lp for lp, _, _ in lps], dtype=torch.float32))
                sample_fields.append(f)
        # token-id prompts carry no text, as in the colocated rollout
        rewards = torch.tensor(score_batch(reward_fn, [""] * len(texts), texts, sample_fields), dtype=torch.float32)
        mask = pad([torch.ones(len(c)) for c in completion_ids])
        return Rollout(prompt_ids, completion_ids, texts, pad(engine_lps, mask.shape[1]), mask, rewards,
                       cfg.group_size)

    def weight_versions(self) -> list[str | None]:
        return [info.get("weight_version") for info in self._each(lambda c: c.get_server_info())]

    def released(self) -> list[list[str]]:
        """Each server's released memory tags (/get_server_info)."""
        return [list(info.get("released", [])) for info in self._each(lambda c: c.get_server_info())]

    def close(self) -> None:
        try:
            if self.distributed is not None:
                self.distributed.close()
        finally:
            for c in self.clients:
                c.close()
            if self.launched is not None:
                self.launched.stop()
