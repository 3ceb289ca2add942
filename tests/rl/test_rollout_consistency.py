"""Rollout and trainer share one model definition: recomputed logprobs match the engine's, and new
weights reach the engine in place."""
from __future__ import annotations

import random

import torch

from rlserve import LLM, SamplingParams
from rlserve.rl.logprobs import completion_logprobs


def test_trainer_logprobs_match_engine_fp32(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-qwen3")))
    rng = random.Random(0)
    prompts = [[rng.randint(10, 20000) for _ in range(rng.randint(5, 40))] for _ in range(8)]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True,
                                                logprobs=0), use_tqdm=False)
    comps = [o.outputs[0].token_ids for o in outs]
    engine_lps = [torch.tensor([next(iter(d.values())) for d in o.outputs[0].logprobs]) for o in outs]
    with torch.no_grad():
        trainer_lps = completion_logprobs(llm.engine.model, prompts, comps)
    diff = max((a - b).abs().max().item() for a, b in zip(engine_lps, trainer_lps))
    assert diff < 1e-4, diff


def test_tempered_logprobs_match_trainer_at_temperature(tiny_model_dir):
    """Sampling at T=0.7: "tempered" logprobs are of softmax(logits / T), what the trainer recomputes;
    "raw" ones (the default) are of the model's own distribution."""
    llm = LLM(str(tiny_model_dir("tiny-qwen3")), overlap_schedule=True)   # both sampling paths
    rng = random.Random(1)
    prompts = [[rng.randint(10, 20000) for _ in range(rng.randint(5, 40))] for _ in range(6)]
    got = {}
    for mode in ("tempered", "raw"):
        outs = llm.generate(prompts, SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True,
                                                    logprobs=0, logprobs_mode=mode), use_tqdm=False)
        comps = [o.outputs[0].token_ids for o in outs]
        got[mode] = [torch.tensor([next(iter(d.values())) for d in o.outputs[0].logprobs]) for o in outs]
    with torch.no_grad():
        tempered = completion_logprobs(llm.engine.model, prompts, comps, temperature=0.7)
        raw = completion_logprobs(llm.engine.model, prompts, comps, temperature=1.0)
    assert max((a - b).abs().max().item() for a, b in zip(got["tempered"], tempered)) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(got["raw"], raw)) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(got["tempered"], raw)) > 1e-2


def test_update_weights_in_place_changes_outputs_and_drops_cache(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-llama")))
    prompt = [[5, 6, 7, 8, 9, 10]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.status().kv_cached > 0
    trainer = llm.engine.model
    new = {n: p.detach().clone() + 0.05 * torch.randn_like(p) for n, p in trainer.named_parameters()}
    ptr = trainer.model.embed_tokens.weight.data_ptr()
    assert llm.engine.update_weights(new.items()) == len(new)
    assert trainer.model.embed_tokens.weight.data_ptr() == ptr
    assert llm.engine.status().kv_cached == 0
    after = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert after != before
    with torch.no_grad():   # the engine now follows the new weights: its greedy token is their argmax
        ids = torch.tensor(prompt[0])
        hidden = trainer(ids, torch.arange(len(ids)))
        assert trainer.compute_logits(hidden[-1:]).argmax().item() == after[0]
