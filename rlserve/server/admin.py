"""The admin routes, with SGLang's names, fields and answers, so that an RL framework's SGLang client drives
rlserve unchanged: weight updates (disk, tensors, a distributed group), memory release and resume, pause
and continue, the weight version, profiling. Fields SGLang has that rlserve has no use for are accepted
and ignored (docs/api.md lists them).

The routes reach the engine process through EngineClient.admin; server/admin_ops.py runs them there.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError

from rlserve.server.errors import APIError, error_body, error_response
from rlserve.server.protocol import _Model
from rlserve.server.state import ServerArgs, ServerState

ADMIN_PATHS = frozenset({
    "/update_weights_from_disk", "/init_weights_update_group", "/destroy_weights_update_group",
    "/update_weights_from_distributed", "/update_weights_from_tensor", "/get_weights_by_name",
    "/release_memory_occupation", "/resume_memory_occupation", "/pause_generation", "/continue_generation",
    "/update_weight_version", "/start_profile", "/stop_profile", "/flush_cache", "/abort_request",
})
GROUP = "weight_update_group"
MemoryTag = Literal["weights", "kv_cache", "cuda_graph"]


# ---- requests ----
class UpdateWeightsFromDiskRequest(_Model):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True          # ignored: an update always drops the prefix cache (its KV is stale)


class InitWeightsUpdateGroupRequest(_Model):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)    # the trainer is rank 0
    world_size: int = Field(ge=2)
    group_name: str = GROUP
    backend: Literal["nccl", "gloo"] = "nccl"


class DestroyWeightsUpdateGroupRequest(_Model):
    group_name: str = GROUP


class UpdateWeightsFromDistributedRequest(_Model):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = GROUP
    flush_cache: bool = True          # ignored, as above
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: Literal["flattened_bucket"] | None = None
    # rlserve's own: the trainer cut the flattened tensors into buckets of at most this many bytes (both
    # sides derive the same cut from the announced shapes); None, as SGLang sends, is one bucket.
    bucket_bytes: int | None = Field(None, ge=1)


class UpdateWeightsFromTensorRequest(_Model):
    # SGLang sends one string per tensor-parallel rank; rlserve's engine is rank 0 and takes the first.
    serialized_named_tensors: str | list[str]
    load_format: Literal["direct", "flattened_bucket"] | None = None
    flush_cache: bool = True          # ignored, as above
    abort_all_requests: bool = False
    weight_version: str | None = None


class GetWeightsByNameRequest(_Model):
    name: str
    truncate_size: int = Field(100, ge=1)


class MemoryOccupationRequest(_Model):
    tags: list[MemoryTag] | None = None     # None: everything


class PauseGenerationRequest(_Model):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class UpdateWeightVersionRequest(_Model):
    new_version: str
    abort_all_requests: bool = False


class StartProfileRequest(_Model):
    # SGLang's output_dir, num_steps, activities and profile_by_stage are ignored: the trace goes to the
    # server's --profile-dir (a client never picks where the server writes) and records until /stop_profile.
    with_stack: bool = False
    record_shapes: bool = False


# ---- security ----
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_matches(headers: dict[bytes, bytes], key: str) -> bool:
    """Whether the request carries 'Authorization: Bearer <key>' (compared in constant time)."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def admin_denial(args: ServerArgs, headers: dict[bytes, bytes]) -> Response | None:
    """Why an admin route is refused (a response to send), or None when it may proceed. With
    --admin-api-key, the admin key is required (and suffices: it stands in for --api-key there); without
    one, only a server bound to loopback serves admin routes."""
    key = args.admin_api_key
    if key:
        if bearer_matches(headers, key):
            return None
        return error_response(401, "this admin route needs the admin key: send 'Authorization: Bearer "
                                   "<admin key>'", code="invalid_admin_api_key")
    if not is_loopback(args.host):
        return error_response(403, "admin routes are refused on a server bound to a non-loopback address "
                                   "without --admin-api-key", code="admin_disabled")
    return None


# ---- answers ----
def failure(data: dict[str, Any]) -> JSONResponse:
    """SGLang's failure shape ({success: false, message}) with the status, plus our usual error object."""
    status = int(data.get("status", 400))
    message = str(data.get("message", "failed"))
    return JSONResponse({"success": False, "message": message, **error_body(status, message)}, status_code=status)


def answer(data: dict[str, Any], *keys: str) -> Any:
    if not data.get("success"):
        return failure(data)
    return {"success": True, "message": data.get("message", ""), **{k: data[k] for k in keys if k in data}}


def add_admin_routes(app: FastAPI, st: Callable[[], ServerState]) -> None:
    async def run(op: str, body: _Model | None = None, **extra: Any) -> dict[str, Any]:
        args = body.model_dump() if body is not None else {}
        return await st().client.admin(op, {**args, **extra})

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightsFromDiskRequest) -> Any:
        return answer(await run("update_weights_from_disk", req), "num_paused_requests", "weight_version")

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(req: InitWeightsUpdateGroupRequest) -> Any:
        return answer(await run("init_weights_update_group", req))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(req: DestroyWeightsUpdateGroupRequest) -> Any:
        return answer(await run("destroy_weights_update_group", req))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(req: UpdateWeightsFromDistributedRequest) -> Any:
        return answer(await run("update_weights_from_distributed", req), "num_paused_requests", "weight_version")

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(req: UpdateWeightsFromTensorRequest) -> Any:
        data = req.serialized_named_tensors
        if isinstance(data, list):
            if not data:
                raise APIError(400, "serialized_named_tensors is empty", param="serialized_named_tensors")
            req = req.model_copy(update={"serialized_named_tensors": data[0]})
        res = answer(await run("update_weights_from_tensor", req), "num_paused_requests", "weight_version")
        if isinstance(res, dict):
            # The engine has copied every tensor before answering: the producer may free or reuse them.
            res["message"] += " The engine holds its own copies: the sender's buffers may be reused."
        return res

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request) -> Any:
        raw = await request.body()
        try:
            req = (GetWeightsByNameRequest.model_validate_json(raw) if raw.strip()
                   else GetWeightsByNameRequest.model_validate(dict(request.query_params)))
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            raise APIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param) from e
        data = await run("get_weights_by_name", req)
        return data["weights"] if data.get("success") else failure(data)

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(req: MemoryOccupationRequest) -> Any:
        return answer(await run("release_memory_occupation", req), "released")

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(req: MemoryOccupationRequest) -> Any:
        return answer(await run("resume_memory_occupation", req), "released")

    @app.post("/pause_generation")
    async def pause_generation(req: PauseGenerationRequest) -> Any:
        return answer(await run("pause_generation", req), "num_paused_requests")

    @app.post("/continue_generation")
    async def continue_generation() -> Any:
        return answer(await run("continue_generation"))

    @app.post("/update_weight_version")
    async def update_weight_version(req: UpdateWeightVersionRequest) -> Any:
        return answer(await run("update_weight_version", req), "new_version")

    @app.post("/start_profile")
    async def start_profile(request: Request) -> Any:
        directory = st().args.profile_dir
        if not directory:
            raise APIError(400, "profiling is off: start the server with --profile-dir DIR")
        raw = await request.body()
        try:
            req = StartProfileRequest.model_validate_json(raw) if raw.strip() else StartProfileRequest()
        except ValidationError as e:
            raise APIError(400, f"invalid request: {e.errors()[0].get('msg')}") from e
        return answer(await run("start_profile", req, output_dir=directory))

    @app.post("/stop_profile")
    async def stop_profile() -> Any:
        if not st().args.profile_dir:
            raise APIError(400, "profiling is off: start the server with --profile-dir DIR")
        return answer(await run("stop_profile"), "path")
