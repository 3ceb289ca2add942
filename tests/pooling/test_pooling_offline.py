"""LLM.embed / LLM.classify match transformers in fp32; batched, chunked, cached and single agree."""
from __future__ import annotations

import pytest
from pooling_models import hf_classify, hf_embedding, hf_qwen2_rm_score

from rlserve.llm import LLM

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Embeddings pool hidden states, " * 6]


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_matches_transformers(pooling_model_dir, preset, pooling):
    path = pooling_model_dir(preset)
    llm = LLM(str(path), dtype="float32", chunked_prefill_size=16)    # long prompts come in chunks
    tok = llm.get_tokenizer()
    batched = llm.embed(PROMPTS, pooling=pooling)
    for prompt, got in zip(PROMPTS, batched):
        ids = tok.encode(prompt, add_special_tokens=False)
        assert _close(got, hf_embedding(path, ids, pooling))
        assert _close(llm.embed(prompt, pooling=pooling)[0], got)       # single == batched
    # Again: the prompts' KV is cached now; last-token pooling reads the cache, mean bypasses it.
    again = llm.embed(PROMPTS, pooling=pooling)
    assert all(_close(a, b) for a, b in zip(again, batched))
    assert llm.engine.status().kv_leaked == 0


def test_embed_token_ids_and_generation_share_a_batch(pooling_model_dir):
    path = pooling_model_dir("tiny-qwen2")
    llm = LLM(str(path), dtype="float32")
    ids = [5, 17, 300, 42, 9]
    from rlserve.sampling import SamplingParams
    rid = llm.engine.add_request(list(ids), SamplingParams(max_tokens=4, ignore_eos=True))
    emb = llm.embed(ids)[0]          # steps the engine: the generation advances beside it
    assert _close(emb, hf_embedding(path, ids, "last"))
    outs = {o.request_id: o for o in llm.engine.step()}
    while rid not in outs or not outs[rid].finished:
        outs.update({o.request_id: o for o in llm.engine.step()})
    assert len(outs[rid].outputs[0].token_ids) == 4 and outs[rid].embedding is None


def test_llama_sequence_classification_matches_transformers(pooling_model_dir):
    path = pooling_model_dir("tiny-llama-cls")
    llm = LLM(str(path), dtype="float32")
    tok = llm.get_tokenizer()
    scores = llm.classify(PROMPTS)
    for prompt, got in zip(PROMPTS, scores):
        ids = tok.encode(prompt, add_special_tokens=False)
        assert len(got) == 3 and _close(got, hf_classify(path, ids))
        assert _close(llm.classify(prompt)[0], got)
    with pytest.raises(ValueError, match="not generation"):
        llm.generate("hi")


def test_qwen2_reward_model_matches_reference(pooling_model_dir):
    path = pooling_model_dir("tiny-qwen2-rm")
    llm = LLM(str(path), dtype="float32")
    ids = [[3, 4, 5, 6], [100, 200, 300]]
    got = llm.classify(ids)
    for row, score in zip(ids, got):
        assert len(score) == 1 and abs(score[0] - hf_qwen2_rm_score(path, row)) < 1e-4


def test_classify_needs_a_head_and_dimensions_a_matryoshka_model(pooling_model_dir):
    llm = LLM(str(pooling_model_dir("tiny-qwen3")), dtype="float32")
    with pytest.raises(ValueError, match="no classification head"):
        llm.classify("hi")
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed("hi", dimensions=8)
    assert len(llm.embed("hi", dimensions=64)[0]) == 64        # the hidden size itself is fine
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]])


def test_in_process_reward_model_combines_with_a_rule(pooling_model_dir):
    import asyncio

    from rlserve.rl.config import RewardModelSection
    from rlserve.rl.reward_model import RewardModel
    from rlserve.rl.rewards import format_reward
    path = pooling_model_dir("tiny-qwen2-rm")
    fn = RewardModel(RewardModelSection(path=str(path), dtype="float32", weight=0.5, rule="format", rule_weight=3.0))
    text = "Q: 2+2? A: \\boxed{4}"
    model = fn.llm.classify(text)[0][0]
    got = asyncio.run(fn("Q: 2+2? ", "A: \\boxed{4}"))
    assert abs(got - (0.5 * model + 3.0 * format_reward("Q: 2+2? ", "A: \\boxed{4}"))) < 1e-6
    with pytest.raises(ValueError, match="label"):
        asyncio.run(RewardModel(RewardModelSection(path=str(path), dtype="float32", label=1))("a", "b"))


def test_default_model_as_an_encoder_matches_transformers(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32")
    tok = llm.get_tokenizer()
    for pooling in ("last", "mean"):
        for prompt, got in zip(PROMPTS, llm.embed(PROMPTS, pooling=pooling)):
            ids = tok.encode(prompt, add_special_tokens=False)
            assert _close(got, hf_embedding(default_model_dir, ids, pooling))
