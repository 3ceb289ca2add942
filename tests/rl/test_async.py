"""Asynchronous training: the staleness buffer never hands out an item staler than the bound whatever the
producer's and trainer's timings (randomized, fixed seeds); the fully asynchronous source over servers that
answer at random times never trains on a sample whose oldest token is too old; one step off in server mode
learns the toy task with every sample exactly one version behind."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rl_toy import share_of_a, toy_config, toy_train

from rlserve.rl.async_loop import FullAsync, StalenessBuffer
from rlserve.rl.train import Timer


@pytest.mark.parametrize("seed", range(6))
def test_buffer_never_hands_out_a_stale_item(seed):
    rng = random.Random(seed)
    max_staleness = rng.choice([0, 1, 2])
    buffer: StalenessBuffer[int] = StalenessBuffer(capacity=rng.randint(3, 8))
    version = [0]                       # the trainer's, read by the producers at random moments
    produced = [0]
    lock = threading.Lock()

    def producer(k: int) -> None:
        r = random.Random(seed * 100 + k)
        while buffer.wait_for_room():
            start = version[0]                          # the oldest token's version: read before "generating"
            time.sleep(r.random() * 0.002)
            with lock:
                produced[0] += 1
            buffer.put(produced[0], start)
    threads = [threading.Thread(target=producer, args=(k,)) for k in range(rng.randint(1, 3))]
    for t in threads:
        t.start()
    taken = 0
    try:
        for step in range(40):
            n = rng.randint(1, 3)
            items, _ = buffer.take(n, version[0], max_staleness)
            assert len(items) == n
            assert all(version[0] - oldest <= max_staleness for _, oldest in items)
            taken += n
            time.sleep(rng.random() * 0.003)            # the update
            version[0] = step + 1
    finally:
        buffer.close()
        for t in threads:
            t.join()
    # every produced item was taken, dropped as stale, or is still there
    assert produced[0] == taken + buffer.dropped + len(buffer)


def test_admission_starts_items_only_as_fast_as_the_steps_take_them():
    """With admission (2 a step, max_staleness 1) producers may have 4 live items started at version 0;
    the fifth waits for a take at version 1, and a dropped item gives its place back."""
    buffer: StalenessBuffer[int] = StalenessBuffer(capacity=10, admission=(2, 1))
    assert buffer.admit(2) and buffer.admit(2) and buffer.started == 4
    waiting = threading.Thread(target=buffer.admit, args=(2,))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and buffer.started == 4
    for i in range(2):
        buffer.put(i, 0)
    assert [item for item, _ in buffer.take(2, 1, 1)[0]] == [0, 1]     # version 1 admits up to 6
    waiting.join(5)
    assert not waiting.is_alive() and buffer.started == 6
    for i in range(2, 4):
        buffer.put(i, 0)
    blocked = threading.Thread(target=buffer.admit, args=(2,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()                     # 6 live of a budget of 6
    buffer.put(4, 3)
    buffer.take(1, 2, 1)                          # version 2: the two version-0 items are dropped ...
    blocked.join(5)
    assert not blocked.is_alive() and buffer.dropped == 2    # ... their places, and version 2's, admit it
    buffer.unadmit(2)
    assert buffer.started == 6
    buffer.close()
    assert not buffer.admit(1)


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_one_producer_in_order_never_generates_a_group_that_goes_stale(tmp_path, max_staleness):
    """One producer's chunks come back in the order they started, so with admission none is dropped:
    the producer never runs further ahead than the bound lets the steps take."""
    cfg = toy_config(Path("unused"), tmp_path, "asynchronous.mode=full",
                     f"asynchronous.max_staleness={max_staleness}", "asynchronous.producers=1",
                     "task.prompts_per_step=3", "rollout.group_size=2", "rollout.constraint=null")
    servers = RandomServers(max_staleness)
    counter = iter(range(10**6))
    source = FullAsync(cfg, SimpleNamespace(), servers, share_of_a,   # type: ignore[arg-type]
                       lambda n: [([next(counter)], {}) for _ in range(n)])
    try:
        for step in range(15):
            _, metrics = source.next(step, 0, Timer())
            assert metrics["groups_dropped_stale"] == 0 and metrics["staleness_max"] <= max_staleness
            time.sleep(0.004)                             # the update: the producer gets ahead if it may
    finally:
        source.close()
    assert source.buffer.dropped == 0
    assert source.buffer.started <= (15 + max_staleness) * 3 + 3


class RandomServers:
    """Stands in for RemoteRollout: answers after a random delay; a push changes the version its running
    requests continue under, which their weight_version_spans report, as a server's do."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.version = 0
        self.seeds: list[list[int]] = []

    def push_weights(self, llm, version: int) -> float:
        time.sleep(self.rng.random() * 0.002)
        self.version = version
        return 0.0

    def _generate(self, prompts, params):
        start = self.version
        time.sleep(self.rng.random() * 0.01)
        now = self.version
        out = []
        for p in params:
            self.seeds.append([p["seed"] + j for j in range(p["n"])])
            items = []
            for j in range(p["n"]):
                r = random.Random(p["seed"] + j)
                tokens = [r.randrange(100) for _ in range(4)]
                spans = [[0, str(start)]] + ([[2, str(now)]] if now != start else [])
                items.append({"output_ids": tokens, "text": "a" * (tokens[0] % 9),
                              "meta_info": {"output_token_logprobs": [(-1.0, t, None) for t in tokens],
                                            "weight_version_spans": spans, "finish_reason": {"type": "length"}}})
            out.append(items)
        return out


@pytest.mark.parametrize("seed", range(4))
def test_full_async_trains_on_nothing_staler_than_the_bound(tmp_path, seed):
    rng = random.Random(seed)
    cfg = toy_config(Path("unused"), tmp_path, "asynchronous.mode=full",
                     f"asynchronous.max_staleness={rng.choice([0, 1, 2])}",
                     f"asynchronous.groups_in_flight={rng.randint(1, 6)}", "task.prompts_per_step=3",
                     f"asynchronous.producers={rng.randint(1, 3)}", "rollout.group_size=4",
                     "rollout.constraint=null")
    servers = RandomServers(seed)
    counter = iter(range(10**6))
    source = FullAsync(cfg, SimpleNamespace(), servers, share_of_a,   # type: ignore[arg-type]
                       lambda n: [([next(counter)], {}) for _ in range(n)])
    bound = cfg.asynchronous.max_staleness
    try:
        for step in range(25):
            rollout, metrics = source.next(step, seed, Timer())
            assert rollout.num_groups == 3 and rollout.token_versions is not None
            oldest = rollout.token_versions.min().item()
            assert step - oldest <= bound and metrics["staleness_max"] <= bound
            time.sleep(rng.random() * 0.005)             # the update
    finally:
        source.close()
    # seeds are distinct inside every group (identical samples would zero the group's advantage)
    assert all(len(set(s)) == len(s) for s in servers.seeds)


class CountingServers(RandomServers):
    """RandomServers that answer slowly and count the requests they are serving at once."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.lock = threading.Lock()
        self.now = self.most = 0

    def _generate(self, prompts, params):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.03)
        try:
            return super()._generate(prompts, params)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("producers", [1, 2])
def test_full_async_producers_draw_chunks_side_by_side(tmp_path, producers):
    """With two producers a second chunk is generating while the first finishes (the servers never
    wait for one chunk's slowest sample); one producer never overlaps itself. Prompts are handed out once."""
    cfg = toy_config(Path("unused"), tmp_path, "asynchronous.mode=full", "asynchronous.max_staleness=2",
                     "asynchronous.groups_in_flight=2", f"asynchronous.producers={producers}",
                     "task.prompts_per_step=2", "rollout.group_size=2", "rollout.constraint=null")
    servers = CountingServers(0)
    counter = iter(range(10**6))
    handed: list[int] = []

    def take(n: int) -> list:
        ids = [next(counter) for _ in range(n)]
        time.sleep(0.001)                                # widen any race between producers
        handed.extend(ids)
        return [([i], {}) for i in ids]
    source = FullAsync(cfg, SimpleNamespace(), servers, share_of_a, take)   # type: ignore[arg-type]
    try:
        for step in range(6):
            rollout, _ = source.next(step, 0, Timer())
            assert rollout.num_groups == 2
    finally:
        source.close()
    assert servers.most == producers
    assert len(handed) == len(set(handed))


def test_asynchronous_producers_must_be_a_positive_integer(tmp_path):
    for bad in ("0", "-1", "1.5"):
        with pytest.raises(ValueError, match="producers"):
            toy_config(Path("unused"), tmp_path, "asynchronous.mode=full", f"asynchronous.producers={bad}")


def test_one_step_off_in_server_mode_learns(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "rollout.backend=server",
                        "asynchronous.mode=one_step_off")
    rewards = [r["reward"] for r in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert start < 0.75 and end > 0.85 and end - start > 0.2, rewards
    # step 0 draws its own rollout; every later step trains on the one drawn a version earlier
    assert [r["staleness_max"] for r in history] == [0.0] + [1.0] * (len(history) - 1)
    assert all("rollout_wait_s" in r for r in history[1:])


def test_full_async_in_server_mode_stays_within_the_bound(tiny_model_dir, tmp_path):
    history = toy_train(tiny_model_dir("tiny-llama"), tmp_path, "rollout.backend=server", "asynchronous.mode=full",
                        "asynchronous.max_staleness=1", "steps=5")
    assert all(r["groups_kept"] == 4 and r["staleness_max"] <= 1 for r in history)
    assert any(r["staleness_max"] == 1 for r in history)       # the rollout did overlap the update
    assert history[-1]["reward"] > history[0]["reward"]
