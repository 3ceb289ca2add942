"""The router's options and the command-line flags for them (light: no router import).

A field left None keeps sglang-router's own default. The flags of `rlserve serve --dp N` and of
`rlserve router` carry a `--router-` prefix where the bare name would clash with a server flag.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "cache_aware"
    cache_threshold: float | None = None            # router default 0.3: a prefix match rate to follow
    balance_abs_threshold: int | None = None        # router default 64: load gap (requests) before balancing
    balance_rel_threshold: float | None = None      # router default 1.5: load ratio before balancing
    max_tree_size: int | None = None                # router default 2^26 characters per tree (LRU beyond)
    eviction_interval_secs: int | None = None       # router default 60
    # A dead worker is marked unhealthy after health_failure_threshold failed checks, one each interval;
    # the router's default interval (60 s) is long for a local launch, so ours is 5 s.
    health_check_interval_secs: int = 5
    health_failure_threshold: int | None = None     # router default 3
    health_success_threshold: int | None = None     # router default 2
    retry_max_retries: int | None = None            # router default 5
    request_timeout_secs: int | None = None         # router default 1800
    # When workers are given at start and not up yet, the router re-checks them this often (default 30 s).
    worker_startup_check_interval: int = 1
    prometheus_port: int | None = None              # None: a free loopback port (the default 29000 clashes)
    log_level: str = "warn"
    api_key: str | None = None                      # sent to the workers as 'Authorization: Bearer'
    extra_args: tuple[str, ...] = field(default_factory=tuple)   # any other sglang-router flags, verbatim

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.cache_threshold is not None and not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"router cache threshold must be in [0, 1], got {self.cache_threshold}")
        if self.health_check_interval_secs < 1:
            raise ValueError("router health-check interval must be at least 1 s")


# Router option → flag of sglang_router.launch_router, for the options passed only when set.
_FLAGS = {
    "cache_threshold": "--cache-threshold", "balance_abs_threshold": "--balance-abs-threshold",
    "balance_rel_threshold": "--balance-rel-threshold", "max_tree_size": "--max-tree-size",
    "eviction_interval_secs": "--eviction-interval-secs",
    "health_check_interval_secs": "--health-check-interval-secs",
    "health_failure_threshold": "--health-failure-threshold",
    "health_success_threshold": "--health-success-threshold", "retry_max_retries": "--retry-max-retries",
    "request_timeout_secs": "--request-timeout-secs",
    "worker_startup_check_interval": "--worker-startup-check-interval", "api_key": "--api-key",
}


def router_flags(cfg: RouterConfig) -> list[str]:
    """sglang-router's flags for `cfg` (without host, port, workers and metrics port)."""
    flags = ["--policy", cfg.policy, "--log-level", cfg.log_level]
    for name, flag in _FLAGS.items():
        value = getattr(cfg, name)
        if value is not None:
            flags += [flag, str(value)]
    return flags + list(cfg.extra_args)


def add_router_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router (sglang-router; see docs/router.md)")
    g.add_argument("--router-policy", choices=POLICIES, default="cache_aware",
                   help="how requests are spread over workers (default cache_aware)")
    g.add_argument("--router-cache-threshold", type=float, default=None,
                   help="cache_aware: the prefix match rate above which a request follows its cached prefix")
    g.add_argument("--router-balance-abs-threshold", type=int, default=None,
                   help="cache_aware: balance by load once max-min load exceeds this (and the relative one)")
    g.add_argument("--router-balance-rel-threshold", type=float, default=None,
                   help="cache_aware: balance by load once max load exceeds min load times this")
    g.add_argument("--router-max-tree-size", type=int, default=None,
                   help="cache_aware: characters kept per worker's prefix tree (LRU beyond)")
    g.add_argument("--router-eviction-interval", type=int, default=None, help="seconds between tree evictions")
    g.add_argument("--router-health-check-interval", type=int, default=5,
                   help="seconds between the router's health checks of each worker (default 5)")
    g.add_argument("--router-health-failure-threshold", type=int, default=None,
                   help="failed checks before a worker is taken out of rotation (router default 3)")
    g.add_argument("--router-retries", type=int, default=None,
                   help="retries of a request that failed on a worker (router default 5)")
    g.add_argument("--router-prometheus-port", type=int, default=None,
                   help="the router's own metrics port (default: a free one)")
    g.add_argument("--router-log-level", default="warn", choices=["debug", "info", "warn", "error"])
    g.add_argument("--router-extra", default="", metavar="FLAGS",
                   help="more sglang-router flags, verbatim, e.g. \"--retry-max-backoff-ms 2000\"")


def router_config_from_args(args: argparse.Namespace, api_key: str | None = None) -> RouterConfig:
    return RouterConfig(
        policy=args.router_policy, cache_threshold=args.router_cache_threshold,
        balance_abs_threshold=args.router_balance_abs_threshold,
        balance_rel_threshold=args.router_balance_rel_threshold, max_tree_size=args.router_max_tree_size,
        eviction_interval_secs=args.router_eviction_interval,
        health_check_interval_secs=args.router_health_check_interval,
        health_failure_threshold=args.router_health_failure_threshold, retry_max_retries=args.router_retries,
        prometheus_port=args.router_prometheus_port, log_level=args.router_log_level, api_key=api_key,
        extra_args=tuple(shlex.split(args.router_extra)))


def add_dp_args(parser: argparse.ArgumentParser) -> None:
    """`rlserve serve`'s data-parallel flags (with the router's)."""
    g = parser.add_argument_group("data parallelism")
    g.add_argument("--dp", type=int, default=1,
                   help="engine servers to start behind a router on --host/--port (default 1: no router)")
    g.add_argument("--devices", default=None, metavar="LIST",
                   help="CUDA device of each worker, e.g. 0,1 or 0,0,0,0 (several on one device split "
                        "--gpu-memory-fraction); default: worker i on device i")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of a worker that dies before it is given up (default 3)")
    g.add_argument("--log-dir", default=None, help="the workers' and the router's logs (default: a temp dir)")
    add_router_args(parser)
