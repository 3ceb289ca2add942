"""The engine's weight API (what the server's SGLang-style routes call): updates from tensors and from disk
are all-or-nothing, reads by HF name return the model's own values, and the version label follows."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlserve import LLM, SamplingParams
from rlserve.models.loader import iter_safetensors

PROMPTS = [[5, 17, 300, 42, 9000, 11], [7, 7, 7, 1200], [100 + i for i in range(30)], [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def params_of(llm: LLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in llm.engine.model.named_parameters()}


def perturbed_copy(src: Path, dst: Path, scale: float = 0.05, drop: str | None = None,
                   extra: dict[str, torch.Tensor] | None = None, reshape: str | None = None) -> Path:
    """A checkpoint like src with every tensor moved by seeded noise (and optionally one tensor dropped,
    extra ones added, or one given the wrong shape)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    gen = torch.Generator().manual_seed(7)
    state = {}
    for name, t in iter_safetensors(src):
        if name == drop:
            continue
        t = t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        state[name] = t[:-1].contiguous() if name == reshape else t.contiguous()
    state.update(extra or {})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture
def model_dir(tiny_model_dir) -> Path:
    return Path(tiny_model_dir("tiny-llama"))


@pytest.fixture
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), max_total_tokens=1024)


def test_a_bad_update_changes_nothing(llm):
    engine = llm.engine
    before, want = params_of(llm), greedy(llm)
    good = [(n, t + 0.5) for n, t in before.items()]
    q = "model.layers.0.self_attn.q_proj.weight"
    bad_cases = {
        "unknown name": good + [("model.layers.99.mlp.up_proj.weight", before[q])],
        "wrong shape": good[:-1] + [(good[-1][0], good[-1][1][:-1])],
        "integer dtype": good[:-1] + [(good[-1][0], good[-1][1].to(torch.int32))],
        "not a tensor": good[:-1] + [(good[-1][0], [1.0, 2.0])],
    }
    for case, pairs in bad_cases.items():
        with pytest.raises(ValueError):
            engine.update_weights(pairs, weight_version="bad")  # type: ignore[arg-type]
        assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters()), case
        assert engine.status().weight_version == "default", case
    assert greedy(llm) == want


def test_update_casts_floating_dtypes_and_keeps_stacked_views(llm):
    engine = llm.engine
    new = {n: (t * 0.9).to(torch.bfloat16) for n, t in params_of(llm).items()}
    assert engine.update_weights(list(new.items()), "bf16") == len(new)
    for n, p in engine.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, new[n].float()), n
    # The stacked q/k/v GEMM reads the same storage: a fresh engine with these weights agrees.
    ref = LLM(str(engine.config.model), max_total_tokens=1024)
    ref.engine.update_weights(list(new.items()))
    assert greedy(llm) == greedy(ref)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_update_from_disk_matches_a_fresh_engine_on_that_checkpoint(tiny_model_dir, tmp_path, preset):
    src = Path(tiny_model_dir(preset))
    new_dir = perturbed_copy(src, tmp_path / "new")
    llm = LLM(str(src), max_total_tokens=1024)
    old = greedy(llm)
    n = llm.engine.update_weights_from_disk(str(new_dir), weight_version="step-3")
    assert n == len(dict(llm.engine.model.named_parameters()))
    status = llm.engine.status()
    assert status.weight_version == "step-3" and status.kv_cached == 0      # the prefix cache was dropped
    want = greedy(LLM(str(new_dir), max_total_tokens=1024))
    assert want != old                                  # the noise really changes greedy choices
    assert greedy(llm) == want


def test_update_from_disk_failures_change_nothing(model_dir, tmp_path, llm):
    engine = llm.engine
    before, want = params_of(llm), greedy(llm)
    q = "model.layers.0.self_attn.q_proj.weight"
    bad = {
        "missing path": tmp_path / "nowhere",
        "missing tensor": perturbed_copy(model_dir, tmp_path / "missing", drop=q),
        "extra tensor": perturbed_copy(model_dir, tmp_path / "extra", extra={"model.extra.weight": torch.ones(3)}),
        "wrong shape": perturbed_copy(model_dir, tmp_path / "shape", reshape=q),
        "a preset": "tiny-llama",
    }
    (tmp_path / "no-weights").mkdir()
    shutil.copy(model_dir / "config.json", tmp_path / "no-weights" / "config.json")
    bad["no weights"] = tmp_path / "no-weights"
    for case, path in bad.items():
        with pytest.raises(ValueError):
            engine.update_weights_from_disk(str(path), weight_version="bad")
        assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters()), case
        assert engine.status().weight_version == "default", case
    with pytest.raises(ValueError, match="load_format"):
        engine.update_weights_from_disk(str(model_dir), load_format="dummy")
    assert greedy(llm) == want


def test_get_weights_by_name_returns_the_models_values(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-qwen2")), max_total_tokens=256)
    engine = llm.engine
    params = dict(engine.model.named_parameters(remove_duplicate=False))
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                 "model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]:
        got = engine.get_weights_by_name(name)
        assert got == params[name][:100].tolist(), name
        assert torch.equal(torch.tensor(got), params[name][:100])
    assert len(engine.get_weights_by_name("model.layers.0.mlp.down_proj.weight", truncate_size=3)) == 3
    # Tied embeddings: lm_head.weight reads the embedding.
    assert engine.get_weights_by_name("lm_head.weight", 5) == params["model.embed_tokens.weight"][:5].tolist()
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.get_weights_by_name("model.layers.0.self_attn.qkv_proj.weight")
    new = [("model.layers.0.self_attn.k_proj.bias", torch.full_like(params["model.layers.0.self_attn.k_proj.bias"], 0.25))]
    engine.update_weights(new)
    assert engine.get_weights_by_name("model.layers.0.self_attn.k_proj.bias") == [0.25] * len(new[0][1])


def test_set_weight_version(llm):
    engine = llm.engine
    engine.set_weight_version("rollout-7")
    assert engine.status().weight_version == "rollout-7"
    with pytest.raises(ValueError):
        engine.set_weight_version("")
    assert engine.status().weight_version == "rollout-7"


def test_updates_are_refused_while_requests_run_unless_paused(llm):
    engine = llm.engine
    weights = list(params_of(llm).items())
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, rid=str(i))
    engine.step()
    with pytest.raises(RuntimeError, match="pause generation"):
        engine.update_weights(weights, "v1")
    engine.pause_generation("in_place")
    assert engine.update_weights(weights, "v1") == len(weights)
    engine.continue_generation()
    while engine.has_unfinished():
        engine.step()
    assert engine.status().weight_version == "v1" and engine.status().kv_leaked == 0


def test_copy_into_groups_plain_copies_and_keeps_casts_and_stand_ins():
    from rlserve.engine.weights import copy_into

    class StandIn:                      # a quantized layer's weight: copy_ is its own (it quantizes)
        def __init__(self) -> None:
            self.got: torch.Tensor | None = None

        def copy_(self, src: torch.Tensor) -> None:
            self.got = src.clone()

    dsts = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, dtype=torch.bfloat16)]
    ptrs = [d.data_ptr() for d in dsts]
    srcs = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(2, 2, dtype=torch.bfloat16)]
    stand_in = StandIn()
    copy_into([*zip(dsts, srcs), (stand_in, srcs[0])])
    for d, s, p in zip(dsts, srcs, ptrs):
        assert d.data_ptr() == p                    # in place: captured graphs and views stay valid
        assert torch.equal(d, s.to(d.dtype))        # a float64 source is cast as copy_ casts
    assert stand_in.got is not None and torch.equal(stand_in.got, srcs[0])
