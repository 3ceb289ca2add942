"""The server's command-line flags; light to import so `rlserve --help` needs no server dependencies."""
from __future__ import annotations

import argparse
import os
from typing import Any

from rlserve.config_args import add_engine_args

# A server bounds its waiting queue (beyond it, requests get 503 at once instead of a long wait);
# an in-process LLM queues without limit.
SERVER_ENGINE_DEFAULTS: dict[str, Any] = {"max_waiting_requests": 1024}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags (with the server's defaults) and the server's own."""
    from rlserve.router.config import add_dp_args  # light: argparse only

    add_engine_args(parser, SERVER_ENGINE_DEFAULTS)
    add_server_args(parser)
    add_dp_args(parser)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("RLSERVE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on every route but /health")
    g.add_argument("--admin-api-key", default=os.environ.get("RLSERVE_ADMIN_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on the admin routes (weight updates, memory, "
                        "pause, profiling, /flush_cache, /abort_request); without it a server bound to a "
                        "non-loopback address refuses them")
    g.add_argument("--profile-dir", default=None,
                   help="directory for torch.profiler traces of /start_profile and /stop_profile "
                        "(default: profiling off)")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    g.add_argument("--logprobs-mode", default="raw", choices=["raw", "tempered"],
                   help="/generate's logprobs_mode for requests that do not give one (a router in front drops "
                        "the field): tempered for RL rollout workers (default raw)")
    g.add_argument("--log-level", default="info")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", "qwen", "llama3"],
                   help="how tool calls are read from generated text (default: from the model family)")
