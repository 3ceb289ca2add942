"""FP8 weights on the GPU (run with `-m gpu`, never in CI): a quantized engine's CUDA graphs give the
eager path's tokens, an RL weight update quantizes the incoming bf16 weights (the updated engine equals
one built from the new checkpoint), and greedy tokens stay close to the bf16 engine's."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA device with FP8 tensor cores")]

from rlserve import LLM  # noqa: E402
from rlserve.layers.quantized import Fp8Linear  # noqa: E402
from rlserve.models.loader import iter_safetensors  # noqa: E402
from tests.engine.test_quantized_engine import PROMPTS, agreement, greedy  # noqa: E402


def fp8_llm(path, **kw) -> LLM:
    return LLM(str(path), dtype="bfloat16", quantization="fp8", max_total_tokens=4096, **kw)


def test_fp8_cuda_graphs_match_eager(tiny_model_dir):
    path = tiny_model_dir("tiny-llama")
    graph = fp8_llm(path, cuda_graph=True)
    assert graph.engine.runner.graphs is not None
    assert isinstance(graph.engine.model.model.layers[0].self_attn.o_proj, Fp8Linear)
    got = greedy(graph)
    assert graph.engine.kv_leaked() == 0
    eager = fp8_llm(path, cuda_graph=False)
    assert eager.engine.runner.graphs is None
    assert got == greedy(eager)


def test_fp8_update_quantizes_incoming_bf16_weights(tiny_model_dir, tmp_path):
    from tests.engine.test_weights_api import perturbed_copy

    path = tiny_model_dir("tiny-llama")
    new_dir = perturbed_copy(path, tmp_path / "new", scale=0.05)
    built = greedy(fp8_llm(new_dir, cuda_graph=True))
    llm = fp8_llm(path, cuda_graph=True)
    before = greedy(llm)
    sent = [(n, t.to(torch.bfloat16)) for n, t in iter_safetensors(new_dir)]
    assert llm.engine.update_weights(iter(sent), weight_version="v2") == len(sent)
    after = greedy(llm)                    # graphs replay on the same buffers, now holding the new FP8 weights
    assert after == built and after != before


def test_fp8_greedy_tokens_stay_close_to_bf16(tiny_model_dir):
    path = tiny_model_dir("tiny-llama")
    ref = greedy(LLM(str(path), dtype="bfloat16", max_total_tokens=4096))
    got = greedy(fp8_llm(path))
    score = agreement(got, ref)
    print(f"fp8 vs bf16 greedy agreement (to first divergence): {score:.3f} over {len(PROMPTS)} prompts")
    assert score >= 0.7
