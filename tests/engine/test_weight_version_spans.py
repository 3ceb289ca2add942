"""Each output records which weight version sampled which of its tokens (weight_version_spans): a request
paused, updated and continued has a boundary at the tokens it had at the pause."""
from __future__ import annotations

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.engine.engine import Engine
from rlserve.engine.request import Request
from rlserve.outputs import RequestOutput

PROMPT = [5, 17, 300, 42, 9000, 11]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def llm(tiny_model_dir, request) -> LLM:
    return LLM(str(tiny_model_dir("tiny-llama")), max_total_tokens=1024, max_running_requests=4,
               overlap_schedule=request.param)


def run_to_end(eng: Engine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while eng.has_unfinished() or eng.in_flight:
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return done


def perturbed(llm: LLM) -> list[tuple[str, torch.Tensor]]:
    name, p = next(iter(llm.engine.model.named_parameters()))
    return [(name, p.detach().clone() + 0.01)]


def test_spans_shape_rules() -> None:
    req = Request(rid="r", group="r", index=0, prompt_ids=[1], params=GREEDY, max_new_tokens=8, arrival=0,
                  weight_version_spans=((0, "a"),))
    req.note_weight_version("b")                      # no token under "a" yet: replaced
    assert req.weight_version_spans == ((0, "b"),)
    req.output_ids += [1, 2, 3]
    req.note_weight_version("b")                      # the same version: nothing new
    req.note_weight_version("c")
    assert req.weight_version_spans == ((0, "b"), (3, "c"))
    req.note_weight_version("b")                      # "c" sampled nothing: back to one span
    assert req.weight_version_spans == ((0, "b"),)


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_update_continue_splits_the_spans(llm, mode):
    eng = llm.engine
    base = eng.weight_version
    eng.add_request(PROMPT, GREEDY, rid=f"split-{mode}")
    for _ in range(5):
        eng.step()
    eng.pause_generation(mode)
    eng.add_request(PROMPT, GREEDY, rid=f"late-{mode}")       # waits: no token before the update
    (req,) = eng.groups[f"split-{mode}"].reqs
    k = len(req.output_ids)                         # every token sampled so far has been taken
    assert 0 < k < GREEDY.max_tokens
    version = f"v2-{mode}"
    eng.update_weights(perturbed(llm), weight_version=version)
    eng.continue_generation()
    done = run_to_end(eng)
    assert done[f"split-{mode}"].outputs[0].weight_version_spans == ((0, base), (k, version))
    assert done[f"late-{mode}"].outputs[0].weight_version_spans == ((0, version),)
    # A request that ran without an update has one span of the version it ran under.
    eng.add_request(PROMPT, GREEDY, rid=f"plain-{mode}")
    (out,) = run_to_end(eng).values()
    assert out.outputs[0].weight_version_spans == ((0, version),)


def test_update_without_a_version_and_a_version_label_alone(llm):
    eng = llm.engine
    eng.set_weight_version("label-0")
    eng.add_request(PROMPT, GREEDY, rid="label")
    for _ in range(4):
        eng.step()
    eng.pause_generation("in_place")
    eng.update_weights(perturbed(llm))             # no version given: the spans stay as they are
    (req,) = eng.groups["label"].reqs
    k = len(req.output_ids)
    eng.set_weight_version("label-1")
    eng.continue_generation()
    (out,) = run_to_end(eng).values()
    assert out.outputs[0].weight_version_spans == ((0, "label-0"), (k, "label-1"))
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
