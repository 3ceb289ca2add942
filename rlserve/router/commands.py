"""`rlserve serve --dp N` and `rlserve router --worker-urls ...`: run in the foreground until SIGTERM or
Ctrl-C, which drains and stops everything they started."""
from __future__ import annotations

import argparse
import logging
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlserve.router.config import add_router_args, router_config_from_args

log = logging.getLogger("rlserve.router")


def server_flags(args: argparse.Namespace) -> list[str]:
    """The `python -m rlserve.server` flags of every worker: the engine's and the server's own, without
    host and port (each worker has its loopback port)."""
    from rlserve.config_args import engine_config_from_args, engine_flags

    flags = [*engine_flags(engine_config_from_args(args)), "--drain-timeout", str(args.drain_timeout),
             "--log-level", args.log_level, "--tool-call-parser", args.tool_call_parser,
             "--logprobs-mode", args.logprobs_mode]
    for flag, value in (("--api-key", args.api_key), ("--admin-api-key", args.admin_api_key),
                        ("--served-model-name", args.served_model_name), ("--profile-dir", args.profile_dir)):
        if value:
            flags += [flag, value]
    return flags


def _on_signals(handler: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: handler())


def _log_dir(value: str | None) -> Path:
    return Path(value) if value else Path(tempfile.mkdtemp(prefix="rlserve-dp-"))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one line per health poll otherwise


def serve_dp_from_args(args: argparse.Namespace) -> int:
    from rlserve.config_args import engine_config_from_args
    from rlserve.router.dp import DataParallel

    _setup_logging(args.log_level)
    engine = engine_config_from_args(args)     # a bad engine flag fails here, before any process starts
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    if devices is None and (engine.device == "auto" or engine.device.startswith("cuda")):
        devices = default_devices(args.dp, engine.device)
    log_dir = _log_dir(args.log_dir)
    dp = DataParallel(server_flags(args), args.dp, host=args.host, port=args.port,
                      router=router_config_from_args(args, args.api_key), log_dir=log_dir, devices=devices,
                      gpu_memory_fraction=engine.cache.gpu_memory_fraction, max_restarts=args.max_restarts,
                      drain_timeout=args.drain_timeout)
    _on_signals(dp.stop_event)
    log.info("starting %d worker(s); logs in %s", args.dp, log_dir)
    try:
        dp.start()
        print(f"rlserve: {args.dp} workers behind the router on http://{args.host}:{dp.port}; router metrics "
              f"{dp.metrics_url}; worker metrics {' '.join(u + '/metrics' for u in dp.worker_urls)}", flush=True)
        dp.run()
    finally:
        dp.stop()
    return 0


def default_devices(dp: int, device: str) -> list[str] | None:
    """Worker i on CUDA device i when CUDA is there (None on CPU: the workers share the host)."""
    import torch

    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise ValueError("--device cuda but CUDA is not available")
        return None
    count = torch.cuda.device_count()
    if dp > count:
        raise ValueError(f"--dp {dp} needs {dp} CUDA devices ({count} visible); to place several workers on "
                         f"one device give --devices, e.g. --devices {','.join(['0'] * dp)}")
    return [str(i) for i in range(dp)]


def add_router_command_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-urls", nargs="+", required=True, metavar="URL",
                        help="the rlserve (or SGLang) servers to route to")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="the workers' --api-key, sent to them by the router")
    parser.add_argument("--log-dir", default=None, help="where the router's log goes (default: a temp dir)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get after SIGTERM (default 30)")
    add_router_args(parser)


def router_from_args(args: argparse.Namespace) -> int:
    """The router alone, in front of servers started elsewhere; its log is echoed when it fails."""
    from rlserve.router.launch import RouterProcess

    _setup_logging("info")
    log_dir = _log_dir(args.log_dir)
    router = RouterProcess(router_config_from_args(args, args.api_key), args.worker_urls, args.host, args.port,
                           log_dir / "router.log", args.drain_timeout)
    stop: dict[str, Any] = {"now": False}
    _on_signals(lambda: stop.update(now=True))
    try:
        router.start()
        print(f"rlserve: router on http://{args.host}:{args.port} in front of {' '.join(args.worker_urls)}; "
              f"metrics {router.metrics_url}; log {router.process.log_path}", flush=True)
        while not stop["now"] and router.process.alive():
            time.sleep(0.5)
        code = router.process.returncode()
        if code is not None and not stop["now"]:
            print(router.process.tail(), flush=True)
            return 1
    finally:
        router.stop()
    return 0
