"""A client of rlserve workers behind sglang-router: generation goes through the router; admin operations
fan out to every worker the router lists (GET /workers), since the router does not route them.

    rc = RouterClient("http://127.0.0.1:8000", admin_api_key="...")
    rc.pause_generation("in_place")
    result = rc.update_weights_from_tensor(list(model.named_parameters()), weight_version="step-3")
    rc.continue_generation()
    result.failed          # {worker url: error} of the workers taken out of rotation

A weight update is all-or-nothing across the workers in rotation: a worker whose update fails is taken
out of the router (DELETE /workers/{id}), so that it never serves its old weights next to workers that
serve the new version, and it is tried again by every later update; the first that succeeds on it puts it
back (POST /workers). When the update fails on every worker, none is taken out (all still serve the same
weights) and `FanOutError` is raised.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlserve.client import DEFAULT_TIMEOUT_S, Client, NamedTensors
from rlserve.router.registry import REGISTER_TIMEOUT_S, WorkerRegistry

log = logging.getLogger("rlserve.router")


@dataclass
class FanOut:
    """One call's outcome on each worker: the decoded answer, or why it failed."""

    answers: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> list[str]:
        return list(self.answers)


class FanOutError(RuntimeError):
    def __init__(self, what: str, result: FanOut) -> None:
        detail = "; ".join(f"{u}: {e}" for u, e in result.failed.items())
        super().__init__(f"{what} failed on {len(result.failed)} worker(s): {detail}")
        self.result = result


class RouterClient:
    """See the module docstring. `api_key`/`admin_api_key` are the workers' (and the router's) keys."""

    def __init__(self, router_url: str, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, register_timeout: float = REGISTER_TIMEOUT_S) -> None:
        self.router = Client(router_url, api_key, admin_api_key, timeout)
        self.registry = WorkerRegistry(router_url, api_key)
        self.api_key, self.admin_api_key, self.timeout = api_key, admin_api_key, timeout
        self.register_timeout = register_timeout
        self.held_out: dict[str, str] = {}      # url → why: out of rotation until an update succeeds on it
        self._clients: dict[str, Client] = {}

    @property
    def base_url(self) -> str:
        return self.router.base_url

    # ---- the workers ----
    def worker_urls(self) -> list[str]:
        """The workers the router lists now (in rotation, healthy or not)."""
        return self.registry.urls()

    def worker(self, url: str) -> Client:
        """A client of one worker, kept for the life of this client."""
        if url not in self._clients:
            self._clients[url] = Client(url, self.api_key, self.admin_api_key, self.timeout)
        return self._clients[url]

    def workers(self) -> list[Client]:
        return [self.worker(u) for u in self.worker_urls()]

    def each(self, fn: Callable[[Client], Any], urls: Sequence[str] | None = None) -> FanOut:
        """`fn(worker client)` on every listed worker (or `urls`) at once; errors are collected, not raised."""
        targets = list(self.worker_urls() if urls is None else urls)
        out = FanOut()
        if not targets:
            return out

        def one(url: str) -> tuple[str, Any, str | None]:
            try:
                return url, fn(self.worker(url)), None
            except Exception as e:       # reported per worker
                return url, None, f"{type(e).__name__}: {e}"
        with ThreadPoolExecutor(len(targets)) as pool:
            for url, answer, error in pool.map(one, targets):
                if error is None:
                    out.answers[url] = answer
                else:
                    out.failed[url] = error
        return out

    def every(self, what: str, fn: Callable[[Client], Any]) -> dict[str, Any]:
        """An admin call that must succeed everywhere: {worker url: answer}, or FanOutError."""
        result = self.each(fn)
        if result.failed:
            raise FanOutError(what, result)
        return result.answers

    # ---- generation: through the router ----
    def generate(self, text: str | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict[str, Any] | None = None, **fields: Any) -> Any:
        """POST /generate through the router: one text (or a batch of input_ids) and one sampling_params
        object; the router forwards SGLang's fields only (seed as `sampling_seed`, no logprobs_mode)."""
        return self.router.generate(text, input_ids, sampling_params, **fields)

    def stream_generate(self, text: str | None = None, input_ids: list[int] | list[list[int]] | None = None,
                        sampling_params: dict[str, Any] | None = None, **fields: Any) -> Generator[Any, None, None]:
        return self.router.stream_generate(text, input_ids, sampling_params, **fields)

    def completions(self, **body: Any) -> Any:
        return self.router.completions(**body)

    def chat(self, **body: Any) -> Any:
        return self.router.chat(**body)

    def stream_completions(self, **body: Any) -> Generator[Any, None, None]:
        return self.router.stream_completions(**body)

    def stream_chat(self, **body: Any) -> Generator[Any, None, None]:
        return self.router.stream_chat(**body)

    def models(self) -> Any:
        return self.router.models()

    # ---- admin: every listed worker ----
    def pause_generation(self, mode: str = "abort") -> dict[str, Any]:
        return self.every("pause_generation", lambda c: c.pause_generation(mode))

    def continue_generation(self) -> dict[str, Any]:
        """Also on the workers held out (what they had in flight when paused finishes there, under their old
        weight version; a held-out worker that does not answer is skipped)."""
        held = [u for u in self.held_out if u not in self.worker_urls()]
        self.each(lambda c: c.continue_generation(), held)
        return self.every("continue_generation", lambda c: c.continue_generation())

    def flush_cache(self) -> dict[str, Any]:
        return self.every("flush_cache", lambda c: c.flush_cache())

    def release_memory_occupation(self, tags: list[str] | None = None) -> dict[str, Any]:
        return self.every("release_memory_occupation", lambda c: c.release_memory_occupation(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> dict[str, Any]:
        return self.every("resume_memory_occupation", lambda c: c.resume_memory_occupation(tags))

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> dict[str, Any]:
        return self.every("update_weight_version", lambda c: c.update_weight_version(new_version, abort_all_requests))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> dict[str, Any]:
        return self.every("get_weights_by_name", lambda c: c.get_weights_by_name(name, truncate_size))

    def get_server_info(self) -> dict[str, Any]:
        return self.every("get_server_info", lambda c: c.get_server_info())

    # ---- weight updates: all-or-nothing ----
    def update_weights(self, fn: Callable[[Client], Any], what: str = "weight update") -> FanOut:
        """`fn(worker client)` on every listed worker and every one held out by an earlier failure. If it
        succeeds somewhere, the workers it failed on leave the router and those it succeeded on come back;
        if it fails everywhere, FanOutError (the workers keep their weights and their place)."""
        urls = self.worker_urls()
        urls += [u for u in self.held_out if u not in urls]
        result = self.each(fn, urls)
        if not result.answers:
            raise FanOutError(what, result)
        for url, error in result.failed.items():
            log.warning("%s failed on %s; taking it out of the router: %s", what, url, error)
            self.held_out[url] = error
            try:
                self.registry.remove(url)
            except Exception as e:       # removal is what keeps it out; say so loudly, the update stands
                log.error("could not take %s out of the router: %s", url, e)
        for url in result.failed:
            self.registry.wait_removed(url)
        back = [u for u in result.answers if u in self.held_out]
        for url in back:
            self.registry.add(url)
        if back:
            self.registry.wait_healthy(back, self.register_timeout)
        for url in back:
            del self.held_out[url]
            log.warning("%s succeeded on %s; it is back in the router", what, url)
        return result

    def update_weights_from_tensor(self, pairs: NamedTensors, load_format: str | None = None,
                                   weight_version: str | None = None, bucket_bytes: int | None | str = "auto",
                                   abort_all_requests: bool = False) -> FanOut:
        """Client.update_weights_from_tensor on every worker (shared memory / CUDA IPC: same host)."""
        return self.update_weights(lambda c: c.update_weights_from_tensor(
            pairs, load_format, weight_version, bucket_bytes, abort_all_requests), "update_weights_from_tensor")

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, abort_all_requests: bool = False) -> FanOut:
        return self.update_weights(lambda c: c.update_weights_from_disk(
            model_path, load_format, weight_version, abort_all_requests), "update_weights_from_disk")

    def close(self) -> None:
        self.router.close()
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
