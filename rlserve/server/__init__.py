"""The HTTP server: a FastAPI front end (tokenizer side) and the engine in its own process, over ZMQ."""
from __future__ import annotations
