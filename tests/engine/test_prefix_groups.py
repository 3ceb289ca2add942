"""Shared-prefix groups for cascade attention, found from the radix tree: who shares what, and the
invariant the kernel relies on (members' table rows hold the same slots up to the shared length)."""
from __future__ import annotations

import random

from rlserve.engine.cache import RadixCache, ReqToTokenPool, TokenAllocator
from rlserve.engine.memory import RequestMemory
from rlserve.engine.prefix_groups import find_prefix_groups
from rlserve.engine.request import Request
from rlserve.sampling import SamplingParams


def admit(memory: RequestMemory, rid: str, prompt: list[int]) -> Request:
    """Admit like the scheduler does, write the prompt's KV, and hand it to the tree."""
    req = Request(rid=rid, group=rid, index=0, prompt_ids=prompt, params=SamplingParams(), max_new_tokens=4,
                  arrival=0)
    n = memory.match_and_lock(req, use_cache=True)
    memory.table.table[req.row, n:len(prompt)] = memory.alloc_tokens(len(prompt) - n)
    req.kv_len = len(prompt)
    memory.cache_written(req)
    return req


def test_groups_follow_the_tree():
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(1, 5000) for _ in range(n)]   # noqa: E731
    memory = RequestMemory(TokenAllocator(10_000), ReqToTokenPool(16, 1024, "cpu"), None)
    memory.tree = RadixCache(memory.allocator)
    doc, other, twin = toks(300), toks(300), toks(400)
    short = toks(100)
    reqs = [admit(memory, f"doc{i}", doc + toks(10)) for i in range(3)]       # 3 questions on one document
    reqs += [admit(memory, "other", other + toks(5))]                        # alone
    reqs += [admit(memory, f"short{i}", short + toks(3)) for i in range(2)]  # shared, but too short
    reqs += [admit(memory, f"twin{i}", list(twin)) for i in range(2)]        # two samples of one prompt

    groups = find_prefix_groups(reqs, max_members=8)
    assert groups is not None
    found = sorted((sorted(reqs[i].rid for i in m), n) for m, n in zip(groups.members, groups.lengths))
    assert found == [(["doc0", "doc1", "doc2"], 300), (["twin0", "twin1"], 400)]
    assert groups.starts == [300, 300, 300, 0, 0, 0, 400, 400]
    assert groups.saved_tokens == 2 * 300 + 1 * 400
    table = memory.table.table
    for members, n, row in zip(groups.members, groups.lengths, groups.rows):
        for i in members:
            assert table[reqs[i].row, :n].tolist() == table[row, :n].tolist()

    # At most max_members per pass; a lone remainder reads its prefix on its own.
    small = find_prefix_groups(reqs, max_members=2)
    assert sorted(len(m) for m in small.members) == [2, 2]
    assert sum(1 for s in small.starts if s == 300) == 2


def test_no_groups_without_sharing_or_cache():
    memory = RequestMemory(TokenAllocator(4_000), ReqToTokenPool(8, 1024, "cpu"), None)
    memory.tree = RadixCache(memory.allocator)
    reqs = [admit(memory, f"r{i}", [i * 1000 + j for j in range(400)]) for i in range(3)]
    assert find_prefix_groups(reqs, max_members=8) is None
    for r in reqs:
        r.last_node = None      # what a request looks like with the prefix cache off
    assert find_prefix_groups(reqs, max_members=8) is None


def test_cascade_flag_reaches_the_engine_and_is_inert_without_triton():
    import argparse

    from rlserve import LLM, SamplingParams
    from rlserve.config_args import add_engine_args
    from rlserve.config_args import engine_options_from_args as engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert "cascade_attention" not in engine_kwargs(parser.parse_args(["--device", "cpu"]))
    kwargs = engine_kwargs(parser.parse_args(["--device", "cpu", "--enable-cascade-attention"]))
    assert kwargs["cascade_attention"] is True
    # The torch backend has no shared-prefix kernel: the engine runs plain decode.
    llm = LLM("tiny-qwen3", load_format="dummy", device="cpu", cascade_attention=True, max_total_tokens=2048)
    assert llm.engine.runner.cascade_max_members == 0
    out = llm.generate([[5] * 300 + [i] for i in range(3)], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    assert llm.engine.runner.cascade_steps == 0
