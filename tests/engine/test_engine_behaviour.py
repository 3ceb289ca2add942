"""Engine behaviour beyond greedy parity: seeds, n > 1, aborts, stops, streaming, limits, bad input."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import hf_model

from rlserve import LLM, SamplingParams
from rlserve.engine.status import LoopCounters


@pytest.fixture(scope="module")
def smol(default_model_dir) -> LLM:
    return LLM(chunked_prefill_size=64)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("tiny-llama")), chunked_prefill_size=32)


def rand_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(10, 20000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def add_greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[str]:
    return [engine.add_request(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            for p in prompts]


def assert_clean(llm: LLM) -> None:
    e = llm.engine
    st = e.status()
    assert not e.has_unfinished() and st.running == st.waiting == 0 and not st.chunked
    assert e.kv_leaked() == 0
    assert e.flush_cache()
    st = e.status()
    assert st.kv_free == st.kv_total
    assert e.table.available() == e.table.table.shape[0] - 1   # one row is the padding row


def test_seeded_sampling_reproducible_and_batch_independent(tiny):
    target = rand_prompts(1, seed=5)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    alone = tiny.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    again = tiny.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = rand_prompts(9, seed=6)
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 9
    batch = others[:4] + [target] + others[4:]
    outs = tiny.generate(batch, mixed_params[:4] + [sp] + mixed_params[4:], use_tqdm=False)
    assert alone == again == outs[4].outputs[0].token_ids
    other_seed = tiny.generate([target], SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=12,
                                                        ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone
    assert_clean(tiny)


def test_seeded_sampling_survives_retraction(tiny_model_dir):
    path = str(tiny_model_dir("tiny-llama"))
    prompts = rand_prompts(12, seed=11, lo=20, hi=40)
    # top_k keeps the draw away from a dense CDF where float noise between a recomputed prefill and
    # incremental decode could tip the choice; the point is that no random draw is repeated or skipped.
    sp = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=30, ignore_eos=True) for i in range(12)]
    roomy = LLM(path).generate(prompts, sp, use_tqdm=False)
    tight_llm = LLM(path, max_total_tokens=300)
    tight = tight_llm.generate(prompts, sp, use_tqdm=False)
    assert tight_llm.engine.status().retractions > 0
    assert [o.outputs[0].token_ids for o in roomy] == [o.outputs[0].token_ids for o in tight]
    assert_clean(tight_llm)


def test_n_samples_are_distinct_and_share_prompt_kv(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    before = smol.engine.status().counters.prompt_tokens
    out = smol.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=3), use_tqdm=False)[0]
    computed = smol.engine.status().counters.prompt_tokens - before
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    # The prompt is computed once; each other sample recomputes only its last token.
    assert computed == len(out.prompt_token_ids) + 3
    assert_clean(smol)


def test_abort_anywhere_frees_memory(tiny):
    e = tiny.engine
    long_prompts = rand_prompts(6, seed=2, lo=80, hi=120)   # several chunks each at budget 32
    rids = [e.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in long_prompts]
    e.step()                                   # the first prompt part-way through chunked prefill
    assert e.status().chunked
    chunked_rid = rids[0]                      # (admitted in arrival order)
    out = e.abort(chunked_rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not e.status().chunked
    started: set[str] = set()
    for _ in range(12):
        started.update(o.request_id for o in e.step() if o.outputs[0].token_ids)
    running = [r for r in rids[1:] if r in started]
    waiting = [r for r in rids[1:] if r not in started]
    assert running, "some requests should be decoding"
    e.abort(running[0])                        # mid-decode
    if waiting:
        e.abort(waiting[-1])                   # never started
    assert e.abort("no-such-request") is None
    assert e.kv_leaked() == 0
    finished = {}
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                finished[o.request_id] = o
    aborted = {chunked_rid, running[0]} | ({waiting[-1]} if waiting else set())
    assert set(finished) == set(rids) - aborted
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert_clean(tiny)


def test_stream_break_aborts_rest(tiny):
    stream = tiny.stream(rand_prompts(4, seed=9), SamplingParams(max_tokens=40, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert_clean(tiny)


def _greedy(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, **kw), use_tqdm=False)[0].outputs[0]


def test_stop_strings_across_token_boundaries(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": "Tell me about the city of Paris."}])
    full = _greedy(smol, prompt)
    tok = smol.get_tokenizer()
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(2, len(pieces) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    cut = len(pieces[i])
    stop = pieces[i + 1][cut - 2:cut + 2]
    start = full.text.find(stop)
    assert 0 <= start
    got = _greedy(smol, prompt, stop=[stop, "zzzz-never"])
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert got.text == full.text[:start]
    got_incl = _greedy(smol, prompt, stop=stop, include_stop_str_in_output=True)
    assert got_incl.text == full.text[:start + len(stop)]
    assert_clean(smol)


def test_stop_token_ids_min_tokens_and_eos(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": "Say hello."}])
    free = _greedy(smol, prompt)
    assert free.finish_reason == "stop" and free.stop_reason is None   # ended by EOS
    assert len(free.token_ids) < 40
    stop_id = free.token_ids[2]
    got = _greedy(smol, prompt, stop_token_ids=[stop_id])
    assert got.token_ids == free.token_ids[:3] and got.stop_reason == stop_id
    longer = _greedy(smol, prompt, min_tokens=len(free.token_ids) + 5)
    assert len(longer.token_ids) >= len(free.token_ids) + 5
    forced = _greedy(smol, prompt, ignore_eos=True)
    assert len(forced.token_ids) == 40 and forced.finish_reason == "length"


def test_streaming_never_yields_broken_characters(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": "用中文写一首关于猫的诗，加上表情符号 🐱🌙✨"}])
    # The first seed (of a few) whose sample holds multi-byte characters: those are what can break.
    params = ids = None
    for seed in range(12):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=60)
        ids = smol.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        if any(ord(c) > 0x2E80 for c in smol.get_tokenizer().decode(ids, skip_special_tokens=True)):
            break
    else:
        pytest.fail("expected some CJK or emoji in one of the outputs")
    seen: list[str] = []
    for out in smol.stream(prompt, params):
        seen.append(out.outputs[0].text)
    final = seen[-1]
    assert final == smol.get_tokenizer().decode(ids, skip_special_tokens=True)
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    if "\ufffd" not in final:
        assert all("\ufffd" not in s for s in seen)


def test_prompt_logprobs_match_transformers(tiny, tiny_model_dir):
    prompt = rand_prompts(1, seed=4, lo=70, hi=70)[0]       # spans several prefill chunks
    out = tiny.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ref = torch.log_softmax(hf_model(tiny_model_dir("tiny-llama"))(torch.tensor([prompt])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        lp = out.prompt_logprobs[t]
        assert abs(lp[prompt[t]] - ref[t - 1, prompt[t]].item()) < 1e-4
        top2 = ref[t - 1].topk(2).indices.tolist()
        assert all(i in lp for i in top2) and len(lp) <= 3


def test_generation_stops_at_context_length(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-llama")), max_model_len=64)
    prompt = rand_prompts(1, seed=3, lo=60, hi=60)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    assert_clean(llm)


@pytest.mark.parametrize("make", [
    lambda: SamplingParams(max_tokens=0),
    lambda: SamplingParams(max_tokens=-3),
    lambda: SamplingParams(top_p=0.0),
    lambda: SamplingParams(top_p=1.5),
    lambda: SamplingParams(temperature=-0.1),
    lambda: SamplingParams(n=0),
    lambda: SamplingParams(logprobs=100),
    lambda: SamplingParams(stop=[""]),
])
def test_bad_sampling_params_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_bad_prompts_rejected_and_engine_keeps_serving(tiny):
    vocab = tiny.engine.model_config.vocab_size
    bad = [[], "", [vocab], [-1], [5] * 5000, ["a", "b"]]
    for prompt in bad:
        with pytest.raises(ValueError):
            tiny.generate([[1, 2, 3], prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert_clean(tiny)   # the good prompt in each batch was never queued or was cleaned up
    ok = tiny.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
    assert_clean(tiny)


def test_unknown_model_rejected():
    with pytest.raises(FileNotFoundError):
        LLM("/nonexistent/model/dir")
    with pytest.raises(FileNotFoundError):
        LLM("no-such-preset")
    with pytest.raises(ValueError):
        LLM("tiny-llama", dtype="float13")
    with pytest.raises(ValueError, match="compile must be"):
        LLM("tiny-llama", compile="max-autotune")


def test_overlap_schedule_stops_aborts_and_matches_sync(tiny_model_dir):
    path = str(tiny_model_dir("tiny-llama"))
    sync = LLM(path, overlap_schedule=False)
    over = LLM(path, overlap_schedule=True)
    ps = rand_prompts(6, seed=21)
    base = sync.generate(ps, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    stop_ids = [o.outputs[0].token_ids[7] for o in base]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[t]) for t in stop_ids]
    want = [o.outputs[0].token_ids for o in sync.generate(ps, params, use_tqdm=False)]
    got_outs = over.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got_outs] == want
    assert over.engine.status().counters.overlapped_steps > 0
    assert_clean(over)
    # Break out of a stream while a step is in flight: everything is aborted and freed.
    for i, _ in enumerate(over.stream(ps, SamplingParams(max_tokens=30, ignore_eos=True))):
        if i == 8:
            break
    over.engine.step()            # a launched step may still be pending; it must settle cleanly
    assert_clean(over)


def test_overlap_continues_while_requests_wait_behind_a_full_batch(tiny_model_dir):
    # max_running_requests=2 with six requests: four wait while two decode. Decode steps still chain
    # (overlapped), admissions happen once a slot frees, and every output equals the sync engine's.
    path = str(tiny_model_dir("tiny-llama"))
    ps = rand_prompts(6, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(6)]
    sync = LLM(path, overlap_schedule=False, max_running_requests=2)
    want = [o.outputs[0].token_ids for o in sync.generate(ps, params, use_tqdm=False)]
    over = LLM(path, overlap_schedule=True, max_running_requests=2)
    e = over.engine
    rids = [e.add_request(p, sp) for p, sp in zip(ps, params)]
    chained_while_waiting = 0
    done = {}
    while e.has_unfinished():
        before = e.status()
        for out in e.step(emit_unfinished=False):
            done[out.request_id] = out.outputs[0].token_ids
        if before.waiting and e.status().counters.overlapped_steps > before.counters.overlapped_steps:
            chained_while_waiting += 1
    assert [done[r] for r in rids] == want
    assert chained_while_waiting > 0
    assert_clean(over)


def test_overlapped_prefill_matches_sync(tiny_model_dir):
    # 120-token chunks make prompts span prefill steps and several complete in one, launched back to back with each
    # step's first tokens read after the next launch. Seeded sampling, a request that ends at its first
    # token, a stop token and a logprobs request (which runs its step in sync, inside the chain) must
    # all give the sync engine's tokens.
    path = str(tiny_model_dir("tiny-llama"))
    ps = rand_prompts(10, seed=9, lo=20, hi=90)
    params = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=1 if i == 3 else 12, ignore_eos=True)
              for i in range(10)]
    params[5] = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    sync = LLM(path, overlap_schedule=False, chunked_prefill_size=120)
    base = sync.generate(ps, params, use_tqdm=False)
    params[7] = SamplingParams(temperature=0.8, seed=107, max_tokens=12, ignore_eos=True,
                               stop_token_ids=[base[7].outputs[0].token_ids[0]])
    want = [o.outputs[0].token_ids for o in sync.generate(ps, params, use_tqdm=False)]
    assert len(want[3]) == 1 and len(want[7]) == 1
    over = LLM(path, overlap_schedule=True, chunked_prefill_size=120)
    got = over.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    lps = got[5].outputs[0].logprobs
    assert len(lps) == 12 and all(len(lp) >= 2 for lp in lps)
    counters = over.engine.status().counters
    assert counters.overlapped_prefills > 2
    assert counters.prompt_tokens == sum(len(p) for p in ps)
    assert_clean(over)


def test_abort_while_a_prefill_is_in_flight(tiny_model_dir):
    path = str(tiny_model_dir("tiny-llama"))
    ps = rand_prompts(4, seed=13, lo=30, hi=60)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, overlap_schedule=False).generate(ps, params, use_tqdm=False)]
    over = LLM(path, overlap_schedule=True, chunked_prefill_size=64)
    e = over.engine
    rids = [e.add_request(p, params) for p in ps]
    assert e.step() == [] and e.status().in_flight                 # launched, not yet read
    assert e.status().counters.overlapped_prefills == 1
    first = rids[0]                            # its prompt fits the first prefill step
    aborted = e.abort(first)
    assert aborted.outputs[0].finish_reason == "abort" and aborted.outputs[0].token_ids == []
    done = {}
    while e.has_unfinished():
        for out in e.step(emit_unfinished=False):
            done[out.request_id] = out.outputs[0].token_ids
    assert first not in done
    assert [done[r] for r, w in zip(rids, want) if r != first] == [w for r, w in zip(rids, want) if r != first]
    while e.in_flight:
        e.step()
    assert_clean(over)


def test_decode_slots_come_in_runs_per_request(tiny_model_dir):
    # Four requests decoding together: each one's new tokens sit in runs of consecutive pool slots (one
    # slot per request per step would interleave them, four apart). Aborting frees the unused rest.
    from rlserve.engine.memory import DECODE_RESERVE
    llm = LLM(str(tiny_model_dir("tiny-llama")), overlap_schedule=False)
    e = llm.engine
    rids = add_greedy(e, rand_prompts(4, seed=3, lo=10, hi=30), max_tokens=60)
    for _ in range(40):
        e.step()
    assert len(e.scheduler.running) == 4
    for req in e.scheduler.running:
        slots = e.memory.table.table[req.row, len(req.prompt_ids):req.kv_len].tolist()
        assert len(slots) > 2 * DECODE_RESERVE
        for i in range(0, len(slots), DECODE_RESERVE):
            run = slots[i:i + DECODE_RESERVE]
            assert run == list(range(run[0], run[0] + len(run))), slots
    assert e.kv_leaked() == 0
    for rid in rids:
        e.abort(rid)
    assert_clean(llm)


def test_update_weights_after_aborting_a_prefill_in_flight(tiny_model_dir):
    # Every request aborted while its prefill is on the device: the engine is idle but holds a launch
    # nobody will read. update_weights settles it instead of refusing, and generation goes on.
    llm = LLM(str(tiny_model_dir("tiny-llama")), overlap_schedule=True)
    e = llm.engine
    rids = add_greedy(e, rand_prompts(3, seed=2, lo=20, hi=40), max_tokens=4)
    e.step()
    assert e.in_flight
    for rid in rids:
        e.abort(rid)
    assert not e.has_unfinished()
    weights = [(n, p.detach().clone()) for n, p in e.model.named_parameters()]
    assert e.update_weights(weights) == len(weights)
    assert not e.in_flight
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert_clean(llm)


def test_stats_count_prefill_and_decode_steps(tiny_model_dir):
    """One prefill step for a batch that fits the chunk budget, then a decode step per further token."""
    llm = LLM(str(tiny_model_dir("tiny-llama")), chunked_prefill_size=512)
    before = llm.engine.status().counters
    llm.generate(rand_prompts(4, seed=3), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    after = llm.engine.status().counters
    delta = {k: getattr(after, k) - getattr(before, k) for k in ("prefill_steps", "decode_steps")}
    assert delta == {"prefill_steps": 1, "decode_steps": 5}


def test_warm_up_leaves_no_trace(tiny_model_dir):
    """After the start-up warm-up (CUDA runs it by itself; here it is called), a seeded engine gives the
    tokens and request ids a fresh engine gives, with zeroed stats, an empty prefix cache and no KV held."""
    prompts = rand_prompts(3, seed=5)
    sampled = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)   # the engine's seed stream

    def run(warm: bool, overlap: bool) -> tuple[list[list[int]], list[str], dict]:
        llm = LLM(str(tiny_model_dir("tiny-llama")), chunked_prefill_size=256, seed=7, overlap_schedule=overlap)
        engine = llm.engine
        if warm:
            engine.warm_up()
            st = engine.status()
            assert not st.in_flight, "warm-up left an overlapped launch to the first real step"
            assert st.counters == LoopCounters()
            assert st.kv_free == st.kv_total, "warm-up left KV behind"
            sched = engine.scheduler
            assert sched.new_token_ratio == sched.cfg.init_new_token_ratio and not sched.prefilled_groups
        rids = [engine.add_request(p, sampled) for p in prompts]
        outs: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                outs[o.request_id] = o.outputs[0].token_ids
        assert_clean(llm)
        counts = dataclasses.asdict(engine.status().counters)
        counts.pop("device_wait_s")            # a wall time, never equal
        return [outs[r] for r in rids], rids, counts

    for overlap in (False, True):   # CUDA overlaps by default; the CPU can be made to
        assert run(True, overlap) == run(False, overlap)


def test_warm_up_runs_every_prefill_size_and_a_cached_prefix(tiny_model_dir, monkeypatch):
    llm = LLM(str(tiny_model_dir("tiny-llama")), chunked_prefill_size=256)
    engine = llm.engine
    seen = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda p, params, rid=None: (seen.append(len(p)), add(p, params, rid))[1])
    cached = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (cached.append(engine.status().counters.cached_tokens), step())[1])
    engine.warm_up()
    assert seen == [256, 128, 64, 32, 16]
    assert max(cached) >= 64, "no warm-up prompt read a cached prefix"


def test_skip_warmup_flag_reaches_the_engine_config_and_a_cpu_engine_never_warms_up(tiny_model_dir, monkeypatch):
    from rlserve.config_args import parse_engine_args
    from rlserve.engine.engine import Engine
    assert parse_engine_args(["--device", "cpu"]).warmup is True
    assert parse_engine_args(["--device", "cpu", "--skip-warmup"]).warmup is False
    assert LLM(str(tiny_model_dir("tiny-llama")), warmup=False).engine.config.warmup is False
    calls = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: calls.append(self))
    LLM(str(tiny_model_dir("tiny-llama")))   # CUDA only: a CPU engine starts at once
    assert calls == []


def test_add_request_refuses_once_max_waiting_requests_wait(tiny_model_dir):
    """Waiting samples count (each of an n > 1 request); a refused request leaves the engine as it was,
    and room opens once the waiting ones are admitted."""
    from rlserve.engine.errors import QueueFullError
    llm = LLM(str(tiny_model_dir("tiny-llama")), max_waiting_requests=3)
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    e.add_request([5, 6, 7], params)
    e.add_request([5, 6, 8], SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True))
    assert e.status().waiting == 3
    with pytest.raises(QueueFullError):
        e.add_request([5, 6, 9], params, rid="refused")
    assert e.status().waiting == 3 and e.abort("refused") is None
    while e.status().waiting:
        e.step()
    e.add_request([5, 6, 9], params, rid="later")
    while e.has_unfinished():
        e.step()
    assert_clean(llm)
