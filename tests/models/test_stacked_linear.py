"""q/k/v and gate/up stacked into one GEMM at inference: same outputs as the separate layers, the
Parameters keep their names and identity, training still reaches each of them, and a broken
sharing falls back to the separate layers instead of reading stale weights."""
from __future__ import annotations

import copy

import torch
from torch import nn

from rlserve.layers.stacked_linear import StackedLinear


def _layers(bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(8, n, bias=bias) for n in (6, 3, 3)]


def test_stacked_outputs_match_the_layers_and_parameters_stay_the_same_objects():
    for bias in (False, True):
        layers = _layers(bias)
        params = [l.weight for l in layers]
        x = torch.randn(5, 8)
        expected = [l(x) for l in layers]
        stacked = StackedLinear(layers)
        assert [l.weight for l in layers] == params                      # identity kept
        assert all(l.weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()
                   for l in layers)
        for got, want in zip(stacked(x), expected):
            torch.testing.assert_close(got, want)


def test_in_place_updates_reach_the_stacked_weight_and_a_rebind_is_noticed():
    layers = _layers(True)
    stacked = StackedLinear(layers)
    x = torch.randn(4, 8)
    loss = sum(l(x).square().sum() for l in layers)                 # training: layer by layer
    loss.backward()
    assert all(l.weight.grad is not None for l in layers)
    torch.optim.SGD([p for l in layers for p in l.parameters()], lr=0.1).step()   # in place
    assert stacked.intact()
    torch.testing.assert_close(stacked(x)[1], layers[1](x))
    layers[2].weight.data = layers[2].weight.data.clone()          # e.g. a release/resume cycle
    assert not stacked.intact()


def test_engine_stacks_and_matches_unstacked_logits(tiny_model_dir):
    from rlserve import LLM
    llm = LLM(str(tiny_model_dir("tiny-qwen2")), device="cpu")    # qwen2: q/k/v carry biases
    model = llm.engine.model
    attn = model.model.layers[0].self_attn
    assert attn.stacked is not None and attn.stacked.intact()
    assert attn.stacked.bias is not None
    ids = torch.tensor([3, 14, 15, 92, 65, 35])
    pos = torch.arange(len(ids))
    with torch.no_grad():
        stacked = model.compute_logits(model(ids, pos))
        plain = copy.deepcopy(model)                          # a deep copy's sharing is not "intact"
        assert not plain.model.layers[0].self_attn.stacked.intact()
        unstacked = plain.compute_logits(plain(ids, pos))
    torch.testing.assert_close(stacked, unstacked, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():                                # the trainer's path: separate layers
        logits = model.compute_logits(model(ids, pos))
        logits[-1].sum().backward()
    assert attn.q_proj.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    torch.testing.assert_close(logits.detach(), stacked, rtol=1e-5, atol=1e-5)


def test_release_and_resume_stack_again(tiny_model_dir):
    from rlserve import LLM, SamplingParams
    llm = LLM(str(tiny_model_dir("tiny-llama")), device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.release_memory(["weights"])
    # Nothing may keep the weights' storage alive while they are released.
    assert llm.engine.model.model.layers[1].mlp.stacked is None
    llm.engine.resume_memory(["weights"])
    mlp = llm.engine.model.model.layers[1].mlp
    assert mlp.stacked.intact()
    assert llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids == before
