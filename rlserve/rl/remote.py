"""Server mode's rollout (`rollout.backend: server`): the trainer keeps the policy; rollouts run on rlserve
servers over HTTP, given by `rollout.server_urls` or, when that is empty, one the trainer launches on a
free loopback port with the model's engine options (and stops at the end). Behind sglang-router
(`rollout.router_url`, or `rollout.dp` > 1: the trainer launches that many servers and the router), the
rollout goes through the router one prompt per request, and the admin calls and weight pushes go to every
worker the router lists (rlserve/router/client.py; a worker whose update fails leaves the router).

Before every step's rollout the trainer pauses the servers (in_place), pushes its weights (shared memory /
CUDA IPC, a safetensors directory, or a broadcast in a weight-update group: rl/weight_push.py) tagged with
the step number as the weight version, and continues them. With server_offload the servers release all
their memory after each rollout and take it back around the next push. The rollout then asks the native
/generate route for exactly what the colocated rollout asks the in-process engine (token ids in; n,
temperature, seed per prompt, tempered logprobs), so a step's samples are the same whichever backend drew
them. The router forwards neither `seed` nor `logprobs_mode`: through it the seed goes as SGLang's
`sampling_seed`, and the workers must default to tempered logprobs (`--logprobs-mode tempered`, which the
trainer gives the workers it launches and checks on a router it is given).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from rlserve.router.client import RouterClient
    from rlserve.router.dp import DataParallel
    from rlserve.router.procs import ManagedProcess

log = logging.getLogger("rlserve")
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
# What a rollout constraint may hold: the native route's structured-output fields and stop tokens.
CONSTRAINT_KEYS = ("regex", "json_schema", "ebnf", "stop_token_ids")
# SGLang's memory occupation tags: all of a server's GPU memory but its CUDA context.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
MAX_ROUTED_REQUESTS = 64     # prompts in flight at once through a router (each with its n samples)


def wait_healthy(process: ManagedProcess, client: Client, timeout: float) -> None:
    """Return once `client`'s server answers /health; RuntimeError if `process` exits first,
    TimeoutError (with the log's tail) after `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"the rollout server exited with {process.returncode()}:\n{process.tail()}")
        try:
            client.health()
            return
        except (httpx.HTTPError, OSError, ServerError):    # not listening, or up and not ready yet
            time.sleep(0.3)
    raise TimeoutError(f"the rollout server did not start within {timeout:.0f} s:\n{process.tail()}")


class LaunchedServer:
    """`python -m rlserve.server` on a free loopback port, in its own process group (so the engine core
    process it starts goes with it); the process handling is rlserve.router.procs.ManagedProcess's."""

    def __init__(self, config: EngineConfig, log_path: Path) -> None:
        from rlserve.router.procs import ManagedProcess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "rlserve.server", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *engine_flags(config)]
        # TORCH_NCCL_ASYNC_ERROR_HANDLING=2: a failed NCCL weight broadcast aborts the group's communicator
        # but leaves the process alive (the default, 3, tears the whole server down); an explicit value wins.
        env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")}
        self.process = ManagedProcess("the rollout server", cmd, log_path, env).start()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process.proc is not None    # started in __init__
        return self.process.proc

    def wait_ready(self, client: Client, timeout: float = STARTUP_TIMEOUT_S) -> None:
        try:
            wait_healthy(self.process, client, timeout)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the server drains and stops its engine process), then SIGKILL to whatever of its group
        outlives `timeout`; returns once the group is empty."""
        self.process.stop(timeout)


class RemoteRollout:
    """The servers a run samples from, the weight push (with the servers' memory offload around it) and
    the rollout over /generate."""

    def __init__(self, urls: list[str], weight_sync: str = "tensor", admin_api_key: str | None = None,
                 launched: LaunchedServer | None = None, *, offload: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, backend: str = "gloo", router_url: str | None = None,
                 dp: DataParallel | None = None) -> None:
        """`router_url`: rollouts through that router, admin calls to the workers it lists (`urls` unused);
        `dp`: the servers and router the trainer launched (stopped by close)."""
        self.router: RouterClient | None = None
        self.dp = dp
        if router_url:
            from rlserve.router.client import RouterClient

            self.router = RouterClient(router_url, admin_api_key=admin_api_key)
            urls = self.router.worker_urls()
            if not urls:
                raise ValueError(f"the router at {router_url} lists no workers")
        self.admin_api_key = admin_api_key       # every client's, for other clients of the same servers
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
        dp = launch_dp(cfg.dp, engine, log_dir) if cfg.dp > 1 else None
        alone = not (cfg.server_urls or cfg.router_url or dp)
        server = LaunchedServer(engine, log_dir / "rollout-server.log") if alone else None
        urls = list(cfg.server_urls) if server is None else [server.url]
        try:
            remote = cls(urls, cfg.weight_sync, key, server, offload=cfg.server_offload,
                         bucket_bytes=cfg.weight_sync_bucket_mb << 20,
                         backend=resolve_backend(cfg.weight_sync_backend, device),
                         router_url=dp.router_url if dp else cfg.router_url or None, dp=dp)
        except BaseException:
            if server is not None:
                server.stop()
            if dp is not None:
                dp.stop()
            raise
        try:
            if server is not None:
                server.wait_ready(remote.clients[0])
            if remote.router is not None:
                remote.check_logprobs_mode(cfg.temperature)
            if remote.distributed is not None:
                remote.distributed.connect()
        except BaseException:
            remote.close()
            raise
        return remote

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self.clients]

    def check_logprobs_mode(self, temperature: float) -> None:
        """Behind a router the workers' default logprobs mode is what the rollout gets; below or above
        temperature 1 (and not greedy) raw logprobs are not the sampled distribution's."""
        modes = {u: info.get("logprobs_mode", "raw") for u, info in zip(self.urls, self._each(Client.get_server_info))}
        raw = sorted(u for u, m in modes.items() if m != "tempered")
        if raw and temperature not in (0.0, 1.0):
            raise ValueError(f"workers {', '.join(raw)} report raw logprobs by default: start them with "
                             "--logprobs-mode tempered (the router drops the request's logprobs_mode)")

    def _each(self, fn: Callable[[Client], Any]) -> list[Any]:
        """`fn` on every server (behind a router: every worker it lists), raising the first failure."""
        if self.router is not None:
            return list(self.router.every("server call", fn).values())
        with self.server_failures():
            if len(self.clients) == 1:
                return [fn(self.clients[0])]
            with ThreadPoolExecutor(len(self.clients)) as pool:
                return list(pool.map(fn, self.clients))

    @contextmanager
    def server_failures(self) -> Iterator[None]:
        """Around calls to the servers: a failure where the server this trainer launched has exited is
        raised as that, with the end of its log (a transport error alone does not tell a crash from a
        network fault); any other failure as it is."""
        try:
            yield
        except Exception as e:
            launched = self.launched
            if launched is None or launched.process.alive():
                raise
            raise RuntimeError(f"the rollout server exited (code {launched.process.returncode()}) before "
                               f"answering; the end of its log ({launched.log_path}):\n"
                               f"{launched.process.tail(3000)}") from e

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
            update = self._each if self.router is None else self._update
            if self.distributed is not None:
                self.distributed.push(llm, version)
            elif self.weight_sync == "disk":
                push_disk(update, llm, version)
            else:
                push_tensor(update, llm, version, self.bucket_bytes)
            if self.offload:
                start = time.perf_counter()
                self._each(lambda c: c.resume_memory_occupation(["kv_cache", "cuda_graph"]))
                resumed += time.perf_counter() - start
        finally:
            if self.router is not None:
                self.router.continue_generation()
            else:
                self._each(lambda c: c.continue_generation())
        return resumed

    def _update(self, fn: Callable[[Client], Any]) -> list[Any]:
        """A weight update behind a router: all-or-nothing (the workers it fails on leave the router)."""
        assert self.router is not None
        result = self.router.update_weights(fn)
        for url, error in result.failed.items():
            log.warning("weight update failed on %s, out of the router until an update succeeds there: %s",
                        url, error)
        return list(result.answers.values())

    def release_memory(self) -> None:
        """After a rollout (server_offload): every server frees its weights, KV cache and CUDA graphs."""
        self._each(lambda c: c.release_memory_occupation(list(MEMORY_TAGS)))

    def _generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Each prompt's n completions (response items), prompts spread round-robin over the servers."""
        if self.router is not None:
            return self._generate_routed(prompts, params)
        k = len(self.clients)
        shards = [list(range(i, len(prompts), k)) for i in range(k)]

        def one(i: int) -> list[dict[str, Any]]:
            rows = shards[i]
            if not rows:
                return []
            items = self.clients[i].generate(input_ids=[prompts[r] for r in rows],
                                             sampling_params=[params[r] for r in rows], return_logprob=True)
            return items if isinstance(items, list) else [items]
        with self.server_failures(), ThreadPoolExecutor(k) as pool:
            answers = list(pool.map(one, range(k)))
        out: list[list[dict[str, Any]]] = [[] for _ in prompts]
        for rows, items in zip(shards, answers):
            it = iter(items)           # prompt by prompt, n items each
            for r in rows:
                out[r] = [next(it) for _ in range(params[r]["n"])]
        return out

    def _generate_routed(self, prompts: list[list[int]], params: list[dict[str, Any]]
                         ) -> list[list[dict[str, Any]]]:
        """Through the router: one request per prompt (it takes one sampling_params object), the seed
        as `sampling_seed`, logprobs_mode left to the workers' default (the router drops both fields)."""
        router = self.router
        assert router is not None

        def one(i: int) -> list[dict[str, Any]]:
            sp = {k: v for k, v in params[i].items() if k not in ("seed", "logprobs_mode")}
            if params[i].get("seed") is not None:
                sp["sampling_seed"] = params[i]["seed"]
            items = router.generate(input_ids=prompts[i], sampling_params=sp, return_logprob=True)
            return items if isinstance(items, list) else [items]
        if not prompts:
            return []
        with ThreadPoolExecutor(min(len(prompts), MAX_ROUTED_REQUESTS)) as pool:
            return list(pool.map(one, range(len(prompts))))

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
            if self.router is not None:
                self.router.close()
            if self.launched is not None:
                self.launched.stop()
            if self.dp is not None:
                self.dp.stop()


def launch_dp(n: int, engine: EngineConfig, log_dir: Path) -> DataParallel:
    """`n` servers with `engine`'s options (tempered logprobs by default) behind a router, on loopback."""
    from rlserve.router.commands import default_devices
    from rlserve.router.dp import DataParallel

    flags = [*engine_flags(engine), "--log-level", "warning", "--logprobs-mode", "tempered"]
    out = log_dir / "rollout-dp"
    out.mkdir(parents=True, exist_ok=True)
    # as `rlserve serve --dp`: one CUDA device each when there are CUDA devices
    return DataParallel(flags, n, log_dir=out, devices=default_devices(n, engine.device),
                        gpu_memory_fraction=engine.cache.gpu_memory_fraction).start()
