"""Command-line flags for an EngineConfig, generated from its fields: a new option is one field (with its
`help`) in rlserve/config.py, and its flag follows.

Each option `name` gets `--name` (underscores as dashes; booleans also get `--no-name`); FLAG_NAMES renames
a few, and LEGACY_FLAGS keeps the older spellings (`--disable-radix-cache`, `--skip-warmup`, ...) working.
A flag left out keeps the config's default. Values are checked by EngineConfig itself, so a bad one ends
as a ValueError naming the option.
"""
from __future__ import annotations

import argparse
import types
from collections.abc import Mapping, Sequence
from dataclasses import fields
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

from rlserve.config import CacheConfig, Choice, EngineConfig, SchedulerConfig, option_help

SECTIONS = (EngineConfig, CacheConfig, SchedulerConfig)

# Options whose flag is not `--<name>` (for backward compatibility or readability).
# (bench offline has a --warmup of its own, so the engine's start-up run is --engine-warmup.)
FLAG_NAMES = {"policy": "--schedule-policy", "compile": "--elementwise", "warmup": "--engine-warmup"}
# Extra spellings of an option's flag.
EXTRA_NAMES = {"max_running_requests": ("--max-running",), "tensor_parallel_size": ("--tp", "--tp-size")}
# Older flags that set one value of an option.
LEGACY_FLAGS: dict[str, tuple[str, Any]] = {
    "--disable-radix-cache": ("enable_radix_cache", False),
    "--disable-cuda-graph": ("cuda_graph", False),
    "--disable-overlap-schedule": ("overlap_schedule", "off"),
    "--disable-compile": ("compile", "eager"),
    "--triton-elementwise": ("compile", "triton"),
    "--inductor-elementwise": ("compile", "inductor"),
    "--enable-cascade-attention": ("cascade_attention", True),
    "--disable-fp32-logits": ("fp32_logits", False),
    "--skip-warmup": ("warmup", False),
}
DEST_PREFIX = "engine_"     # engine options live apart from other flags of the same parser (bench's --warmup)
_SOURCES = "_engine_flag_sources"


def parse_bytes(text: str) -> int:
    """'268435456', '256M', '2G', '1.5GiB' → bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 512M or 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"byte size must be positive, got {text!r}")
    return value


# Flags that read a value other than the field's type.
VALUE_PARSERS = {"kv_cache_bytes": parse_bytes}


class _SetOption(argparse.Action):
    """Stores an option's value; two different flags for one option exclude each other."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.nargs == 0:
            values = not option_string.startswith("--no-") if self.const is None and option_string else self.const
        sources: dict[str, str] = namespace.__dict__.setdefault(_SOURCES, {})
        earlier = sources.get(self.dest)
        if earlier is not None and earlier != option_string:
            raise argparse.ArgumentError(self, f"{earlier} and {option_string} exclude each other")
        sources[self.dest] = option_string or self.dest
        setattr(namespace, self.dest, values)


def _field_kind(cls: type, name: str) -> type:
    """The field's type without `| None`."""
    hint = get_type_hints(cls)[name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint if isinstance(hint, type) else str


def engine_options() -> list[tuple[str, type, Any]]:
    """(name, type, default) of every option, in the order of the config's fields."""
    out = []
    for cls in SECTIONS:
        for f in fields(cls):
            if f.name not in ("cache", "scheduler"):
                out.append((f.name, _field_kind(cls, f.name), f.default))
    return out


def flag_name(name: str) -> str:
    """The command-line flag of an engine option."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_engine_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """Add a flag for every engine option. `defaults` replaces the config's default of some options for
    this command (a server limits its waiting queue): those flags always pass their value on."""
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - {name for name, _, _ in engine_options()})
    if unknown:
        raise TypeError(f"defaults for unknown engine options: {', '.join(unknown)}")
    g = parser.add_argument_group("engine", "the options of rlserve.config.EngineConfig")
    for name, kind, default in engine_options():
        default = defaults.get(name, default)
        flags = [flag_name(name), *EXTRA_NAMES.get(name, ())]
        shown = default.value if isinstance(default, Enum) else default
        text = f"{option_help(name)} (default: {shown})".replace("%", "%%")
        common: dict[str, Any] = dict(dest=DEST_PREFIX + name, action=_SetOption, help=text,
                                      default=defaults.get(name))
        if kind is bool:
            g.add_argument(*flags, f"--no-{flags[0].removeprefix('--')}", nargs=0, **common)
        elif issubclass(kind, Choice):
            g.add_argument(*flags, metavar="{" + ",".join(m.value for m in kind) + "}", **common)
        else:
            g.add_argument(*flags, type=VALUE_PARSERS.get(name, kind), metavar=name.split("_")[-1].upper(),
                           **common)
    for flag, (name, value) in LEGACY_FLAGS.items():
        new = flag_name(name)
        same = (new if value else "--no-" + new.removeprefix("--")) if isinstance(value, bool) else f"{new} {value}"
        g.add_argument(flag, dest=DEST_PREFIX + name, action=_SetOption, nargs=0, const=value,
                       help=f"same as {same}")


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the command line set (by name), for EngineConfig.with_options or LLM(...)."""
    return {name: value for name, _, _ in engine_options()
            if (value := getattr(args, DEST_PREFIX + name, None)) is not None}


def engine_config_from_args(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """The EngineConfig the flags describe (on top of `base`, or the defaults). A bad value raises a
    ValueError that names the flag."""
    try:
        return (base or EngineConfig()).with_options(**engine_options_from_args(args))
    except ValueError as e:
        option = str(e).split(" ", 1)[0]    # EngineConfig's messages start with the option's name
        if option in FLAG_NAMES:
            raise ValueError(f"{FLAG_NAMES[option]}: {e}") from None
        raise


def engine_flags(config: EngineConfig) -> list[str]:
    """The command line that gives `config` (the inverse of parse_engine_args): a flag for every option
    that differs from the default."""
    default, given = EngineConfig().to_options(), config.to_options()
    flags: list[str] = []
    for name, kind, _ in engine_options():
        value = given[name]
        if value == default[name] or value is None:
            continue
        flag = flag_name(name)
        if kind is bool:
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            flags += [flag, str(value)]
    return flags


def parse_engine_args(argv: Sequence[str], defaults: Mapping[str, Any] | None = None) -> EngineConfig:
    """The EngineConfig of an engine-only command line (tests, scripts)."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser, defaults)
    return engine_config_from_args(parser.parse_args(argv))
