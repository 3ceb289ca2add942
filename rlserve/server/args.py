"""The server's command-line flags; light to import so `rlserve --help` needs no server dependencies."""
from __future__ import annotations

import os
from typing import Any


def add_server_args(parser: Any) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("RLSERVE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on every route but /health")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="beyond this many waiting requests new ones get 503 (default 1024)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    g.add_argument("--log-level", default="info")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", "qwen", "llama3"],
                   help="how tool calls are read from generated text (default: from the model family)")
