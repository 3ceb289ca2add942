"""EngineConfig is the one way to configure an engine: its options by name (LLM keyword arguments, the
command-line flags generated from its fields), enums for every closed set, and checked values."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rlserve.config import (
    AttentionBackend,
    CacheConfig,
    DType,
    Elementwise,
    EngineConfig,
    KVCacheDtype,
    LoadFormat,
    SchedulePolicy,
    SchedulerConfig,
    Switch,
    option_help,
    option_names,
)
from rlserve.config_args import (
    DEST_PREFIX,
    FLAG_NAMES,
    LEGACY_FLAGS,
    add_engine_args,
    engine_config_from_args,
    engine_options_from_args,
    parse_engine_args,
)

ROOT = Path(__file__).resolve().parent.parent

# Every option away from its default (the round trip below then exercises every flag).
EVERYTHING_SET = EngineConfig(
    model="some/model", load_format="dummy", dtype="bfloat16", device="cuda:1", seed=7, max_model_len=1000,
    attention_backend="torch", cuda_graph=False, cuda_graph_max_bs=16, compile="inductor", overlap_schedule="off",
    tokenizer="some/tokenizer", kv_cache_dtype="fp8_e4m3", cascade_attention=True, fp32_logits=False,
    warmup=False, grammar_helpers=2, memory_saver="auto", pooling="mean", quantization="int4",
    quantization_group_size=64, tensor_parallel_size=2,
    cache=CacheConfig(kv_cache_bytes=1 << 20, gpu_memory_fraction=0.5, max_total_tokens=4096,
                      enable_radix_cache=False),
    scheduler=SchedulerConfig(max_running_requests=8, chunked_prefill_size=512, policy="lpm",
                              init_new_token_ratio=0.5, min_new_token_ratio=0.05, new_token_ratio_decay=0.01,
                              retract_ratio_step=0.2, max_waiting_requests=9))


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_args(parser, **kwargs)
    return parser


def _argv(config: EngineConfig) -> list[str]:
    """The command line that describes `config` (every option spelled out)."""
    argv = []
    for name, value in config.to_options().items():
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# ---- one option, one flag ----
def test_every_field_of_the_config_and_its_sections_is_an_option_with_a_flag_and_help():
    fields = [f.name for cls in (EngineConfig, CacheConfig, SchedulerConfig) for f in dataclasses.fields(cls)
              if f.name not in ("cache", "scheduler")]
    assert set(fields) <= set(option_names())
    dests = {action.dest for action in _parser()._actions}
    missing = [name for name in fields if DEST_PREFIX + name not in dests]
    assert not missing, f"options without a command-line flag: {missing}"
    assert all(option_help(name) for name in fields)


def test_flags_round_trip_a_config_with_every_option_set():
    defaults = EngineConfig().to_options()
    assert all(EVERYTHING_SET.to_options()[n] != defaults[n] for n in defaults), "set every option"
    assert parse_engine_args(_argv(EVERYTHING_SET)) == EVERYTHING_SET


def test_flags_left_out_keep_the_config_defaults():
    args = _parser().parse_args([])
    assert engine_options_from_args(args) == {}
    assert engine_config_from_args(args) == EngineConfig()
    base = EngineConfig(dtype="float32")
    assert engine_config_from_args(_parser().parse_args(["--seed", "3"]), base) == EngineConfig(dtype="float32", seed=3)


def test_older_flag_spellings_still_work():
    config = parse_engine_args(["--disable-radix-cache", "--max-running", "8", "--kv-cache-bytes", "512M",
                                "--disable-cuda-graph", "--disable-overlap-schedule", "--skip-warmup",
                                "--enable-cascade-attention", "--disable-fp32-logits", "--schedule-policy", "lpm",
                                "--kv-cache-dtype", "fp8_e4m3"])
    assert config.cache.enable_radix_cache is False and config.cache.kv_cache_bytes == 512 << 20
    assert config.scheduler.max_running_requests == 8 and config.scheduler.policy is SchedulePolicy.LPM
    assert config.cuda_graph is False and config.overlap_schedule is Switch.OFF and config.warmup is False
    assert config.cascade_attention is True and config.fp32_logits is False
    assert config.kv_cache_dtype is KVCacheDtype.FP8_E4M3
    assert set(LEGACY_FLAGS) >= {"--disable-compile", "--triton-elementwise", "--inductor-elementwise"}


@pytest.mark.parametrize("flags, mode", [([], Elementwise.AUTO), (["--triton-elementwise"], Elementwise.TRITON),
                                         (["--inductor-elementwise"], Elementwise.INDUCTOR),
                                         (["--disable-compile"], Elementwise.EAGER),
                                         (["--elementwise", "eager"], Elementwise.EAGER)])
def test_the_elementwise_flags_pick_the_kernels(flags, mode):
    assert parse_engine_args(["--device", "cpu", *flags]).compile is mode


@pytest.mark.parametrize("pair", [["--triton-elementwise", "--disable-compile"],
                                  ["--inductor-elementwise", "--disable-compile"],
                                  ["--triton-elementwise", "--inductor-elementwise"],
                                  ["--elementwise", "eager", "--triton-elementwise"],
                                  ["--disable-radix-cache", "--enable-radix-cache"]])
def test_two_flags_for_one_option_exclude_each_other(pair, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(pair)
    assert "exclude each other" in capsys.readouterr().err


def test_the_server_bounds_its_waiting_queue_through_the_engine_config():
    from rlserve.server.args import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert engine_config_from_args(parser.parse_args([])).scheduler.max_waiting_requests == 1024
    assert engine_config_from_args(parser.parse_args(["--max-waiting-requests", "5"])).scheduler \
        .max_waiting_requests == 5
    assert parse_engine_args([]).scheduler.max_waiting_requests is None      # in-process: no limit


def test_bad_flag_values_are_value_errors_naming_the_option():
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        parse_engine_args(["--chunked-prefill-size", "0"])
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        parse_engine_args(["--dtype", "foo"])
    with pytest.raises(ValueError, match="^--elementwise: compile must be one of auto, triton, inductor, eager"):
        parse_engine_args(["--elementwise", "fast"])


# ---- enums and checked values ----
def test_enumerations_are_enums_and_older_spellings_map_onto_them():
    config = EngineConfig(dtype="bf16", compile=True, overlap_schedule=False, kv_cache_dtype="fp8",
                          load_format="GGUF", attention_backend="triton")
    assert config.dtype is DType.BFLOAT16 and config.compile is Elementwise.INDUCTOR
    assert config.overlap_schedule is Switch.OFF and config.kv_cache_dtype is KVCacheDtype.FP8_E4M3
    assert config.load_format is LoadFormat.GGUF and config.attention_backend is AttentionBackend.TRITON
    assert EngineConfig(compile=False).compile is Elementwise.EAGER
    assert EngineConfig(overlap_schedule=True).overlap_schedule is Switch.ON
    assert SchedulerConfig(policy="lpm").policy is SchedulePolicy.LPM
    assert EngineConfig().dtype == "auto" and f"{DType.BFLOAT16}" == "bfloat16"     # still plain strings


@pytest.mark.parametrize("make, message", [
    (lambda: EngineConfig(dtype="float8"), "dtype must be one of auto, float32, bfloat16, float16"),
    (lambda: EngineConfig(compile="fast"), "compile must be one of auto, triton, inductor, eager"),
    (lambda: EngineConfig(overlap_schedule="sometimes"), "overlap_schedule must be one of auto, on, off"),
    (lambda: EngineConfig(load_format="pickle"), "load_format must be one of"),
    (lambda: EngineConfig(attention_backend="flash"), "attention_backend must be one of auto, torch, triton"),
    (lambda: EngineConfig(kv_cache_dtype="int4"), "kv_cache_dtype must be one of auto, fp8_e4m3"),
    (lambda: SchedulerConfig(policy="random"), "policy must be one of fcfs, lpm"),
    (lambda: EngineConfig(device="nonsense"), "unknown device 'nonsense'"),
    (lambda: EngineConfig(max_model_len=0), "max_model_len must be a positive integer"),
    (lambda: EngineConfig(grammar_helpers=-1), "grammar_helpers must be an integer ≥ 0"),
    (lambda: EngineConfig(cuda_graph="yes"), "cuda_graph must be true or false"),
    (lambda: SchedulerConfig(max_running_requests=0), "max_running_requests must be a positive integer"),
    (lambda: SchedulerConfig(chunked_prefill_size=0), "chunked_prefill_size must be a positive integer"),
    (lambda: SchedulerConfig(max_waiting_requests=0), "max_waiting_requests must be a positive integer"),
    (lambda: SchedulerConfig(min_new_token_ratio=0.9), "min_new_token_ratio"),
    (lambda: CacheConfig(gpu_memory_fraction=1.5), r"gpu_memory_fraction must be a number in \(0.0, 1.0\]"),
    (lambda: CacheConfig(max_total_tokens=-5), "max_total_tokens must be a positive integer"),
])
def test_bad_values_are_clear_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- options by name ----
def test_options_by_name_reach_their_section_and_unknown_ones_list_the_valid():
    config = EngineConfig().with_options(dtype="float32", max_total_tokens=64, schedule_policy="lpm",
                                         chunked_prefill_size=32, enable_radix_cache=False, grammar_helpers=0)
    assert config.dtype is DType.FLOAT32 and config.grammar_helpers == 0
    assert config.cache == CacheConfig(max_total_tokens=64, enable_radix_cache=False)
    assert config.scheduler == SchedulerConfig(chunked_prefill_size=32, policy="lpm")
    assert EngineConfig().with_options(scheduler={"max_running_requests": 4}).scheduler.max_running_requests == 4
    assert EngineConfig().with_options(**config.to_options()) == config
    with pytest.raises(TypeError, match="unknown engine option max_tokens; valid options: model, load_format"):
        EngineConfig().with_options(max_tokens=3)
    with pytest.raises(TypeError, match="given twice"):
        EngineConfig().with_options(policy="lpm", schedule_policy="fcfs")


def test_llm_rejects_an_unknown_option_with_the_list_before_loading_anything():
    from rlserve import LLM

    with pytest.raises(TypeError) as info:
        LLM("/nonexistent", max_totl_tokens=64)
    assert "max_totl_tokens" in str(info.value)
    assert all(name in str(info.value) for name in option_names())


def test_llm_takes_a_whole_config_and_options_change_it(tiny_model_dir):
    from rlserve import LLM

    base = EngineConfig(model=str(tiny_model_dir("tiny-llama")), device="cpu",
                        cache=CacheConfig(max_total_tokens=256))
    llm = LLM(config=base, chunked_prefill_size=64)
    assert llm.config == base.with_options(chunked_prefill_size=64)
    assert llm.engine.config is llm.config
    assert llm.engine.status().kv_total == 256


# ---- the command line's imports ----
def test_rlserve_help_imports_no_benchmark_code():
    code = ("import sys, rlserve.cli\ntry:\n    rlserve.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('rlserve.bench')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_server_and_the_benchmarks_do_not_import_the_command_line_module():
    offenders = []
    for path in [*ROOT.joinpath("rlserve", "server").rglob("*.py"), *ROOT.joinpath("rlserve", "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n == "rlserve.cli"]
    assert not offenders
