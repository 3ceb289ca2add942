"""The engine process's side of the admin routes: weight updates, memory, pause and profiling.

Each operation runs in the engine loop between two steps, so no step is half done while it changes the
engine. A weight update pauses generation in place around the copy (running requests keep their KV and
go on with the new weights; new requests wait), unless the caller aborts everything first. A long
operation (a load from disk, a broadcast from the trainer) holds the loop: nothing generates meanwhile,
which is what a paused engine does anyway.

Every operation answers a dict: {"success": True, ...} or, for an error that left the engine as it was,
{"success": False, "message": ..., "status": 400}. The engine's current weight version goes with every
answer, so the front end can report it without asking.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlserve.server import ipc

if TYPE_CHECKING:
    from rlserve.server.core import EngineLoop

log = logging.getLogger("rlserve.core")
ENGINE_MEMORY_TAGS = ("kv_cache", "weights")
# Errors that the engine raises for bad input or a wrong state, having changed nothing.
CLIENT_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, OSError)


class AdminOps:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.engine = loop.engine
        self.profiler: torch.profiler.profile | None = None
        self.profile_dir: str | None = None
        # Tensors mapped from another process for an update that is done: dropped once its answer is out.
        self.retired: list[Any] = []

    def run(self, op: str, args: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        """Run one operation: the updates it produced (aborted requests) and its answer."""
        fn: Callable[[dict[str, Any]], tuple[list[ipc.Update], dict[str, Any]]] | None = getattr(
            self, f"op_{op}", None)
        if fn is None:
            return [], {"success": False, "message": f"unknown admin operation {op!r}", "status": 400}
        try:
            updates, data = fn(args)
            data.setdefault("success", True)
        except CLIENT_ERRORS as e:
            log.warning("%s failed: %s", op, e)
            updates, data = [], {"success": False, "message": _message(e), "status": 400}
        except Exception as e:
            log.error("%s failed:\n%s", op, traceback.format_exc())
            updates, data = [], {"success": False, "message": f"internal error: {_message(e)}", "status": 500}
        data["weight_version"] = self.engine.weight_version
        return updates, data

    def release_retired(self) -> None:
        """Drop the mapped tensors of finished updates (after their answers went out), in a thread: the
        next command (a trainer's continue_generation) need not wait for the unmapping either."""
        if not self.retired:
            return
        batches, self.retired = self.retired, []
        threading.Thread(target=_unmap, args=(batches,), name="rlserve-unmap", daemon=True).start()

    # ---- helpers ----
    def _abort_all(self) -> list[ipc.Update]:
        """End every request now with finish_reason "abort" (their outputs go out at once)."""
        return self.loop.handle(ipc.Abort(None))

    def _paused_update(self, abort_all: bool, update: Callable[[], int]) -> tuple[list[ipc.Update], dict[str, Any]]:
        """Run `update` with generation paused in place (unless it was paused already), then continue."""
        updates = self._abort_all() if abort_all else []
        eng = self.engine
        was_paused = eng.paused
        paused = 0 if was_paused else eng.pause_generation("in_place")
        try:
            n = update()
        finally:
            if not was_paused:
                eng.continue_generation()
        return updates, {"message": f"Succeeded to update {n} parameter tensors.", "num_paused_requests": paused,
                         "num_updated": n}

    # ---- weights ----
    def op_update_weights_from_disk(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        return self._paused_update(a.get("abort_all_requests", False), lambda: self.engine.update_weights_from_disk(
            a["model_path"], a.get("load_format"), a.get("weight_version")))

    def op_update_weights_from_tensor(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        from rlserve.weight_sync.tensors import deserialize_tensors

        t0 = time.perf_counter()
        pairs = deserialize_tensors(a["serialized_named_tensors"], a.get("load_format"))
        t1 = time.perf_counter()

        def update() -> int:
            return self.engine.update_weights(pairs, a.get("weight_version"))
        try:
            return self._paused_update(a.get("abort_all_requests", False), update)
        finally:
            # Unmapping costs per tensor (a CUDA IPC handle or a shared-memory file each): the loop drops
            # them after the answer has gone, so that the trainer does not wait for it.
            self.retired.append(pairs)
            log.info("update_weights_from_tensor: %d tensors, handles read in %.1f ms, paused update %.1f ms",
                     len(pairs), (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)

    def op_init_weights_update_group(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        from rlserve.weight_sync.group import init_weights_update_group

        name = a["group_name"]
        init_weights_update_group(a["master_address"], a["master_port"], a["rank_offset"], a["world_size"],
                                  name, a["backend"])
        return [], {"message": f"Joined the weight update group {name!r} as rank {a['rank_offset']}."}

    def op_destroy_weights_update_group(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        from rlserve.weight_sync.group import destroy_weights_update_group

        name = a["group_name"]
        destroy_weights_update_group(name)
        return [], {"message": f"Left the weight update group {name!r}."}

    def op_update_weights_from_distributed(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        from rlserve.weight_sync.group import get_weights_update_group, receive_weights

        group = get_weights_update_group(a["group_name"])
        # Received in full before anything is copied: a peer that fails mid-broadcast changes nothing.
        pairs = receive_weights(group, a["names"], a["dtypes"], a["shapes"], a.get("load_format"),
                                self.engine.device, a.get("bucket_bytes"))
        return self._paused_update(a.get("abort_all_requests", False),
                                   lambda: self.engine.update_weights(pairs, a.get("weight_version")))

    def op_get_weights_by_name(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        return [], {"weights": self.engine.get_weights_by_name(a["name"], a.get("truncate_size", 100))}

    def op_update_weight_version(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        updates = self._abort_all() if a.get("abort_all_requests", False) else []
        self.engine.set_weight_version(a["new_version"])
        return updates, {"message": f"Weight version set to {a['new_version']!r}.", "new_version": a["new_version"]}

    # ---- memory ----
    def op_release_memory_occupation(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        tags = _engine_tags(a.get("tags"))
        if tags:
            self.engine.release_memory(tags)
        return [], {"message": f"Released {', '.join(tags) or 'nothing'}.", "released": self._released()}

    def op_resume_memory_occupation(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        tags = _engine_tags(a.get("tags"))
        if tags:
            self.engine.resume_memory(tags)
        return [], {"message": f"Resumed {', '.join(tags) or 'nothing'}.", "released": self._released()}

    def _released(self) -> list[str]:
        return sorted(self.engine.released_memory())

    # ---- pause ----
    def op_pause_generation(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        mode = a.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"mode must be abort, retract or in_place; got {mode!r}")
        eng = self.engine
        updates: list[ipc.Update] = []
        if mode == "abort":
            # Aborted here rather than by the engine's next step: the loop does not step a paused engine,
            # and the streams should end now.
            n = len(self.loop.sent)
            updates = self._abort_all()
            if not eng.paused:
                eng.pause_generation("in_place")
        else:
            n = eng.pause_generation(mode)
        return updates, {"message": f"Generation paused ({mode}).", "num_paused_requests": n}

    def op_continue_generation(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        if self.engine.paused:
            self.engine.continue_generation()
        return [], {"message": "Generation continued."}

    # ---- profiling ----
    def op_start_profile(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        if self.profiler is not None:
            raise ValueError("a profile is already being recorded; call /stop_profile first")
        directory = a["output_dir"]
        os.makedirs(directory, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.engine.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities, record_shapes=bool(a.get("record_shapes")),
                                      with_stack=bool(a.get("with_stack")))
        prof.start()
        self.profiler, self.profile_dir = prof, directory
        return [], {"message": "Profiling started."}

    def op_stop_profile(self, a: dict[str, Any]) -> tuple[list[ipc.Update], dict[str, Any]]:
        prof, directory = self.profiler, self.profile_dir
        if prof is None or directory is None:
            raise ValueError("no profile is being recorded; call /start_profile first")
        self.profiler = self.profile_dir = None
        prof.stop()
        path = Path(directory) / f"rlserve-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.trace.json"
        prof.export_chrome_trace(str(path))
        return [], {"message": f"Profile written to {path}.", "path": str(path)}


def _engine_tags(tags: list[str] | None) -> list[str]:
    """SGLang's memory tags as the engine's: "cuda_graph" needs no tag of its own, since the engine drops
    its graphs whenever memory is released and captures them again once everything is resumed."""
    if tags is None:
        return list(ENGINE_MEMORY_TAGS)
    unknown = set(tags) - {*ENGINE_MEMORY_TAGS, "cuda_graph"}
    if unknown:
        raise ValueError(f"unknown memory tags {sorted(unknown)}; use weights, kv_cache and cuda_graph")
    return [t for t in ENGINE_MEMORY_TAGS if t in tags]


def _message(e: BaseException) -> str:
    # str(KeyError) quotes its argument; the message reads better without.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__


def _unmap(batches: list[Any]) -> None:
    """Drop mapped tensors a few at a time, yielding the interpreter between (each drop unmaps while it
    holds it)."""
    for pairs in batches:
        while pairs:
            del pairs[-16:]
            time.sleep(0)
