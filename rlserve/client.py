"""A client of an rlserve (or SGLang-compatible) server: one method per route, sync (`Client`) and async
(`AsyncClient`), plus the trainer's side of the weight updates.

    client = Client("http://127.0.0.1:8000", admin_api_key="...")
    client.pause_generation("retract")
    client.update_weights_from_tensor(list(model.named_parameters()), weight_version="step-3")
    client.continue_generation()

Route methods return the decoded JSON answer and raise `ServerError` for an error status. The streaming
methods (`stream_generate`, `stream_completions`, `stream_chat`) are generators (async generators on
`AsyncClient`) of the parsed JSON chunks; closing one early closes the HTTP response, which aborts the request
on the server. httpx is imported when a client is built, so `import rlserve` stays light.
"""
from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rlserve.weight_sync.group import WeightSender

NamedTensors = Sequence[tuple[str, "torch.Tensor"]]
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_BUCKET_BYTES = 512 << 20
GROUP = "weight_update_group"
_SHARING_LOCK = threading.Lock()


class ServerError(Exception):
    """An error status from the server; `status` and the decoded `body` say what happened."""

    def __init__(self, status: int, body: Any, path: str) -> None:
        message = body
        if isinstance(body, dict):
            err = body.get("error")
            message = err.get("message") if isinstance(err, dict) else body.get("message", body)
        super().__init__(f"{path}: HTTP {status}: {message}")
        self.status, self.body, self.path = status, body, path


@functools.cache
def _tls_context() -> Any:
    """One TLS context for every client of this process: httpx builds one per client otherwise, loading the
    CA bundle each time (~18 ms a client; a rollout opens a client per 16 samples)."""
    import httpx

    return httpx.create_ssl_context()


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _generate_body(text: Any, input_ids: Any, sampling_params: Any, fields: dict[str, Any]) -> dict[str, Any]:
    return _drop_none({"text": text, "input_ids": input_ids, "sampling_params": sampling_params, **fields})


_DONE = object()


def _sse_event(line: str, path: str) -> Any:
    """One line of a server-sent event stream: the parsed JSON of a `data:` line, `_DONE` for `[DONE]`, None
    for anything else (blank lines, comments, other fields). An in-band error event raises `ServerError`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    event = json.loads(data)
    if isinstance(event, dict) and "error" in event and "choices" not in event:
        raise ServerError(200, event, path)   # failed mid-stream: the status line (200) was already sent
    return event


def tensor_bucket_bytes(load_format: str | None, bucket_bytes: int | None | str) -> int | None:
    """Bytes per update_weights_from_tensor call; "auto": one call for direct handles, which copy nothing
    on the sending side (each call costs a round trip, a pause check and a device sync: ~7 ms on an H100),
    and DEFAULT_BUCKET_BYTES for flattened buckets, each of which is a copy the sender holds."""
    if bucket_bytes != "auto":
        return bucket_bytes if bucket_bytes is None or isinstance(bucket_bytes, int) else int(bucket_bytes)
    return DEFAULT_BUCKET_BYTES if load_format == "flattened_bucket" else None


def _buckets(pairs: NamedTensors, bucket_bytes: int | None) -> list[list[tuple[str, torch.Tensor]]]:
    """`pairs` in order, cut where a bucket would pass bucket_bytes (a bigger tensor goes alone)."""
    out: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if not out or (bucket_bytes is not None and out[-1] and size + n > bucket_bytes):
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += n
    return out


class _Routes:
    """The routes, written once: `_call` does the request (sync) or returns its coroutine (async)."""

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, admin: bool = False) -> Any:
        raise NotImplementedError

    # ---- generation ----
    def generate(self, text: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, **fields: Any) -> Any:
        """POST /generate (not streaming); `fields`: rid, return_logprob, top_logprobs_num."""
        return self._call("POST", "/generate", _generate_body(text, input_ids, sampling_params, fields))

    def completions(self, **body: Any) -> Any:
        return self._call("POST", "/v1/completions", body)

    def chat(self, **body: Any) -> Any:
        return self._call("POST", "/v1/chat/completions", body)

    def models(self) -> Any:
        return self._call("GET", "/v1/models")

    def tokenize(self, text: str, **fields: Any) -> Any:
        return self._call("POST", "/tokenize", {"text": text, **fields})

    def detokenize(self, tokens: list[int], **fields: Any) -> Any:
        return self._call("POST", "/detokenize", {"tokens": tokens, **fields})

    # ---- state ----
    def health(self) -> Any:
        return self._call("GET", "/health")

    def health_generate(self) -> Any:
        return self._call("GET", "/health_generate")

    def get_model_info(self) -> Any:
        return self._call("GET", "/get_model_info")

    def get_server_info(self) -> Any:
        return self._call("GET", "/get_server_info")

    def flush_cache(self) -> Any:
        return self._call("POST", "/flush_cache", admin=True)

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> Any:
        return self._call("POST", "/abort_request", _drop_none({"rid": rid, "abort_all": abort_all}), admin=True)

    # ---- weights ----
    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, abort_all_requests: bool = False) -> Any:
        return self._call("POST", "/update_weights_from_disk", _drop_none({
            "model_path": model_path, "load_format": load_format, "weight_version": weight_version,
            "abort_all_requests": abort_all_requests}), admin=True)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = GROUP, backend: str = "nccl") -> Any:
        return self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}, admin=True)

    def destroy_weights_update_group(self, group_name: str = GROUP) -> Any:
        return self._call("POST", "/destroy_weights_update_group", {"group_name": group_name}, admin=True)

    def announce_distributed_update(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                    group_name: str = GROUP, load_format: str | None = None,
                                    weight_version: str | None = None, bucket_bytes: int | None = None,
                                    abort_all_requests: bool = False) -> Any:
        """POST /update_weights_from_distributed: the engine receives what the trainer broadcasts."""
        return self._call("POST", "/update_weights_from_distributed", _drop_none({
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "load_format": load_format, "weight_version": weight_version, "bucket_bytes": bucket_bytes,
            "abort_all_requests": abort_all_requests}), admin=True)

    def update_weights_from_serialized(self, serialized_named_tensors: str, load_format: str | None = None,
                                       weight_version: str | None = None, abort_all_requests: bool = False) -> Any:
        """POST /update_weights_from_tensor with an already serialized payload."""
        return self._call("POST", "/update_weights_from_tensor", _drop_none({
            "serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
            "weight_version": weight_version, "abort_all_requests": abort_all_requests}), admin=True)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        return self._call("POST", "/get_weights_by_name", {"name": name, "truncate_size": truncate_size}, admin=True)

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> Any:
        return self._call("POST", "/update_weight_version",
                          {"new_version": new_version, "abort_all_requests": abort_all_requests}, admin=True)

    # ---- memory, pause, profiling ----
    def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._call("POST", "/release_memory_occupation", {"tags": tags}, admin=True)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._call("POST", "/resume_memory_occupation", {"tags": tags}, admin=True)

    def pause_generation(self, mode: str = "abort") -> Any:
        return self._call("POST", "/pause_generation", {"mode": mode}, admin=True)

    def continue_generation(self) -> Any:
        return self._call("POST", "/continue_generation", admin=True)

    def start_profile(self) -> Any:
        return self._call("POST", "/start_profile", admin=True)

    def stop_profile(self) -> Any:
        return self._call("POST", "/stop_profile", admin=True)


class _Base(_Routes):
    def __init__(self, base_url: str, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_api_key, self.timeout = api_key, admin_api_key, timeout

    def _headers(self, admin: bool) -> dict[str, str]:
        key = (self.admin_api_key or self.api_key) if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @staticmethod
    def _decode(resp: Any, path: str) -> Any:
        try:
            body = resp.json() if resp.content else None
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, body, path)
        return body if body is not None else True


class Client(_Base):
    """Synchronous client (httpx)."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        import httpx

        super().__init__(base_url, api_key, admin_api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, verify=_tls_context())

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, admin: bool = False) -> Any:
        resp = self._http.request(method, path, json=body, headers=self._headers(admin))
        return self._decode(resp, path)

    def _stream(self, path: str, body: dict[str, Any]) -> Generator[Any, None, None]:
        with self._http.stream("POST", path, json={**body, "stream": True}, headers=self._headers(False)) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._decode(resp, path)
            for line in resp.iter_lines():
                event = _sse_event(line, path)
                if event is _DONE:
                    return
                if event is not None:
                    yield event

    # ---- streaming: generators of the parsed chunks; close() (or leaving a `with closing(...)`) aborts ----
    def stream_generate(self, text: str | list[str] | None = None,
                        input_ids: list[int] | list[list[int]] | None = None,
                        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                        **fields: Any) -> Generator[Any, None, None]:
        """POST /generate with stream=true: the cumulative item of a sequence each time it advances."""
        return self._stream("/generate", _generate_body(text, input_ids, sampling_params, fields))

    def stream_completions(self, **body: Any) -> Generator[Any, None, None]:
        """POST /v1/completions with stream=true: the `text_completion` chunks."""
        return self._stream("/v1/completions", body)

    def stream_chat(self, **body: Any) -> Generator[Any, None, None]:
        """POST /v1/chat/completions with stream=true: the `chat.completion.chunk` chunks."""
        return self._stream("/v1/chat/completions", body)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the trainer's side ----
    def update_weights_from_tensor(self, pairs: NamedTensors, load_format: str | None = None,
                                   weight_version: str | None = None, bucket_bytes: int | None | str = "auto",
                                   abort_all_requests: bool = False) -> Any:
        """Send (name, tensor) pairs without copying their data through HTTP: CPU tensors as shared memory,
        CUDA tensors as IPC handles, in calls of at most `bucket_bytes` (None: one call; "auto": one call
        for direct handles, DEFAULT_BUCKET_BYTES per flattened bucket). The weight version is set by the
        last call. `pairs` must stay alive until this returns (the engine has copied them)."""
        res: Any = None
        buckets = _buckets(pairs, tensor_bucket_bytes(load_format, bucket_bytes))
        for i, bucket in enumerate(buckets):
            res = self.update_weights_from_serialized(
                _serialize(bucket, load_format), load_format,
                weight_version if i == len(buckets) - 1 else None, abort_all_requests and i == 0)
        return res

    def connect_weight_sender(self, sender: WeightSender, rank_offset: int = 1) -> Any:
        """Create the sender's group with the server at `rank_offset` (both sides block until both joined)."""
        return _in_background(lambda: self.init_weights_update_group(**sender.init_request(rank_offset)),
                              sender.init_group)

    def update_weights_from_distributed(self, sender: WeightSender, pairs: NamedTensors,
                                        load_format: str | None = "flattened_bucket",
                                        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
                                        weight_version: str | None = None) -> Any:
        """Announce `pairs` to the server (in a background request) while `sender` broadcasts them."""
        plist = list(pairs)
        meta = sender.describe(plist, bucket_bytes, load_format)
        return _in_background(
            lambda: self.announce_distributed_update(weight_version=weight_version, **meta),
            lambda: sender.broadcast(plist, bucket_bytes, load_format))


class AsyncClient(_Base):
    """Asynchronous client (httpx.AsyncClient): the same methods, awaited."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, max_connections: int | None = 100) -> None:
        """`max_connections`: requests in flight at once (httpx's default, 100; more wait for a free
        connection). None: no bound, every connection kept alive for reuse: what a rollout wants, whose
        every live sample has a turn on the server at once (the server batches them)."""
        import httpx

        super().__init__(base_url, api_key, admin_api_key, timeout)
        limits = (httpx.Limits(max_connections=None, max_keepalive_connections=None) if max_connections is None
                  else httpx.Limits(max_connections=max_connections, max_keepalive_connections=20))
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits, verify=_tls_context())

    async def _acall(self, method: str, path: str, body: dict[str, Any] | None, admin: bool) -> Any:
        resp = await self._http.request(method, path, json=body, headers=self._headers(admin))
        return self._decode(resp, path)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, admin: bool = False) -> Any:
        return self._acall(method, path, body, admin)

    async def _astream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[Any, None]:
        async with self._http.stream("POST", path, json={**body, "stream": True},
                                     headers=self._headers(False)) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                self._decode(resp, path)
            async for line in resp.aiter_lines():
                event = _sse_event(line, path)
                if event is _DONE:
                    return
                if event is not None:
                    yield event

    # ---- streaming: async generators; `await gen.aclose()` (or contextlib.aclosing) aborts early ----
    def stream_generate(self, text: str | list[str] | None = None,
                        input_ids: list[int] | list[list[int]] | None = None,
                        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                        **fields: Any) -> AsyncGenerator[Any, None]:
        """As Client.stream_generate, iterated with `async for`."""
        return self._astream("/generate", _generate_body(text, input_ids, sampling_params, fields))

    def stream_completions(self, **body: Any) -> AsyncGenerator[Any, None]:
        return self._astream("/v1/completions", body)

    def stream_chat(self, **body: Any) -> AsyncGenerator[Any, None]:
        return self._astream("/v1/chat/completions", body)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def update_weights_from_tensor(self, pairs: NamedTensors, load_format: str | None = None,
                                         weight_version: str | None = None,
                                         bucket_bytes: int | None | str = "auto",
                                         abort_all_requests: bool = False) -> Any:
        """As Client.update_weights_from_tensor."""
        res: Any = None
        buckets = _buckets(pairs, tensor_bucket_bytes(load_format, bucket_bytes))
        for i, bucket in enumerate(buckets):
            res = await self.update_weights_from_serialized(
                _serialize(bucket, load_format), load_format,
                weight_version if i == len(buckets) - 1 else None, abort_all_requests and i == 0)
        return res

    async def connect_weight_sender(self, sender: WeightSender, rank_offset: int = 1) -> Any:
        call = self.init_weights_update_group(**sender.init_request(rank_offset))
        res, _ = await asyncio.gather(call, asyncio.to_thread(sender.init_group))
        return res

    async def update_weights_from_distributed(self, sender: WeightSender, pairs: NamedTensors,
                                              load_format: str | None = "flattened_bucket",
                                              bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
                                              weight_version: str | None = None) -> Any:
        plist = list(pairs)
        meta = sender.describe(plist, bucket_bytes, load_format)
        call = self.announce_distributed_update(weight_version=weight_version, **meta)
        res, _ = await asyncio.gather(call, asyncio.to_thread(sender.broadcast, plist, bucket_bytes, load_format))
        return res


def _serialize(pairs: list[tuple[str, torch.Tensor]], load_format: str | None) -> str:
    import torch.multiprocessing as tmp

    from rlserve.weight_sync.tensors import serialize_flattened_bucket, serialize_named_tensors

    # CPU tensors shared as file descriptors are handed over by a socket that only this process's
    # multiprocessing children may use (its authkey); the server is no child of the trainer. Named
    # shared-memory files can be opened by any process of the user.
    # The strategy is process-wide: one serialization at a time (a fan-out to several servers runs threads).
    with _SHARING_LOCK:
        strategy = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy("file_system")
        try:
            if load_format == "flattened_bucket":
                return serialize_flattened_bucket(pairs)
            return serialize_named_tensors(pairs)
        finally:
            tmp.set_sharing_strategy(strategy)


def _in_background(request: Any, work: Any) -> Any:
    """Run `request()` in a thread while `work()` runs here; return the request's answer. Both sides of a
    rendezvous block until the other arrives, so neither can go first."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = request()
        except BaseException as e:   # handed to the caller below
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        work()
    finally:
        t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
