from __future__ import annotations

import random

import pytest
import torch

from rlserve.engine.cache import RadixCache, ReqToTokenPool, TokenAllocator, TreeNode
from rlserve.kv_pool import KVPool


def slots(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def tree_slots(cache: RadixCache) -> list[int]:
    out: list[int] = []
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        out.extend(node.value.tolist())
        stack.extend(node.children.values())
    return out


def check_sizes(cache: RadixCache) -> None:
    """The incrementally kept sizes must equal a full recount of the tree."""
    evictable = protected = 0
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        assert len(node.key) == len(node.value) > 0
        for first, child in node.children.items():
            assert child.key[0] == first and child.parent is node
        if node.lock_ref > 0:
            protected += len(node.key)
        else:
            evictable += len(node.key)
        stack.extend(node.children.values())
    assert (cache.evictable_size(), cache.protected_size()) == (evictable, protected)
    assert cache.total_size() == evictable + protected


def make(size: int = 64) -> tuple[TokenAllocator, RadixCache]:
    alloc = TokenAllocator(size)
    return alloc, RadixCache(alloc)


def put(alloc: TokenAllocator, cache: RadixCache, key: list[int]) -> torch.Tensor:
    """Insert key with freshly allocated slots, freeing duplicates as the engine would."""
    value = alloc.alloc(len(key))
    assert value is not None
    present = cache.insert(key, value)
    alloc.free(value[:present])
    return value


# --- TokenAllocator -------------------------------------------------------------------------------

def test_allocator_alloc_free_accounting() -> None:
    alloc = TokenAllocator(10)
    assert alloc.available() == 10
    a = alloc.alloc(4)
    b = alloc.alloc(6)
    assert a is not None and b is not None and a.dtype == torch.int64
    ids = torch.cat([a, b]).tolist()
    assert sorted(ids) == list(range(1, 11))   # distinct, and slot 0 is never handed out
    assert alloc.available() == 0
    alloc.free(a)
    alloc.free(torch.empty(0, dtype=torch.int64))
    assert alloc.available() == 4
    again = alloc.alloc(4)
    assert again is not None and sorted(again.tolist()) == sorted(a.tolist())
    alloc.reset()
    assert alloc.available() == 10


def test_allocator_returns_none_on_exhaustion_without_allocating() -> None:
    alloc = TokenAllocator(5)
    first = alloc.alloc(3)
    assert first is not None
    assert alloc.alloc(3) is None
    assert alloc.available() == 2
    rest = alloc.alloc(2)
    assert rest is not None and set(rest.tolist()).isdisjoint(first.tolist())
    assert alloc.alloc(1) is None
    assert alloc.alloc(0) is not None and alloc.alloc(0).numel() == 0


def test_allocator_reuses_freed_chunks_across_many_frees() -> None:
    alloc = TokenAllocator(8)
    held = [alloc.alloc(1) for _ in range(8)]
    for t in held[::2]:
        alloc.free(t)
    got = alloc.alloc(4)
    assert got is not None and sorted(got.tolist()) == sorted(torch.cat(held[::2]).tolist())


# --- KVPool and ReqToTokenPool --------------------------------------------------------------------

def test_kv_pool_store_then_read_back() -> None:
    pool = KVPool(num_layers=2, num_slots=9, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    assert pool.k_buffers[1].shape == (9, 2, 4)
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    where = slots(7, 2, 5)
    pool.store(1, where, k, v)
    torch.testing.assert_close(pool.k_buffers[1][where], k)
    torch.testing.assert_close(pool.v_buffers[1][where], v)
    assert pool.k_buffers[0].abs().sum() == 0     # other layers untouched
    assert pool.k_buffers[1][slots(0, 1, 3)].abs().sum() == 0


def test_kv_pool_bytes_per_token() -> None:
    assert KVPool.bytes_per_token(4, 2, 64, torch.bfloat16) == 2 * 4 * 2 * 64 * 2
    assert KVPool.bytes_per_token(1, 1, 8, torch.float32) == 64


def test_req_to_token_pool_alloc_free() -> None:
    pool = ReqToTokenPool(max_requests=3, max_context_len=16, device="cpu")
    assert pool.table.shape == (3, 16) and pool.table.dtype == torch.int64 and not pool.table.any()
    rows = [pool.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2] and pool.available() == 0
    assert pool.alloc() is None
    pool.free(rows[1])
    assert pool.available() == 1 and pool.alloc() == rows[1]
    with pytest.raises(ValueError):
        pool.free(7)
    pool.free(rows[0])
    with pytest.raises(ValueError):
        pool.free(rows[0])


# --- RadixCache -----------------------------------------------------------------------------------

def test_insert_then_exact_and_partial_match() -> None:
    alloc, cache = make()
    value = put(alloc, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 4])
    assert m.indices.tolist() == value.tolist()
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert m.indices.tolist() == value.tolist()
    m = cache.match_prefix([9, 1, 2])
    assert m.indices.numel() == 0 and m.indices.dtype == torch.int64 and m.last_node is cache.root
    assert cache.match_prefix([]).last_node is cache.root
    check_sizes(cache)


def test_match_ending_mid_node_splits_it() -> None:
    alloc, cache = make()
    value = put(alloc, cache, [1, 2, 3, 4, 5])
    assert cache.total_size() == 5
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.indices.tolist() == value[:3].tolist()
    node = m.last_node
    assert node.key == [1, 2, 3] and node.parent is cache.root
    assert list(node.children) == [4] and node.children[4].key == [4, 5]
    assert node.children[4].value.tolist() == value[3:].tolist()
    assert cache.total_size() == cache.evictable_size() == 5 and alloc.available() == 64 - 5
    check_sizes(cache)
    # Locking the split-off prefix protects only those 3 tokens.
    cache.inc_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (3, 2)
    check_sizes(cache)


def test_split_of_locked_node_keeps_sizes() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4, 5])
    cache.inc_lock_ref(cache.match_prefix([1, 2, 3, 4, 5]).last_node)
    m = cache.match_prefix([1, 2])
    assert m.last_node.lock_ref == 1
    assert (cache.protected_size(), cache.evictable_size()) == (5, 0)
    check_sizes(cache)


def test_insert_returns_present_count_and_owns_only_the_tail() -> None:
    alloc, cache = make()
    first = alloc.alloc(3)
    assert cache.insert([1, 2, 3], first) == 0
    second = alloc.alloc(5)
    assert second is not None
    assert cache.insert([1, 2, 3, 7, 8], second) == 3
    alloc.free(second[:3])   # duplicates stay with the caller
    assert cache.match_prefix([1, 2, 3, 7, 8]).indices.tolist() == first.tolist() + second[3:].tolist()
    assert cache.insert([1, 2], slots(40, 41)) == 2    # fully present: tree keeps its slots
    assert cache.match_prefix([1, 2]).indices.tolist() == first[:2].tolist()
    assert cache.total_size() == 5
    assert alloc.available() + cache.total_size() == alloc.size
    check_sizes(cache)


def test_insert_copies_value_so_caller_buffers_can_be_reused() -> None:
    alloc, cache = make()
    row = torch.zeros(8, dtype=torch.int64)
    row[:3] = alloc.alloc(3)
    expected = row[:3].tolist()
    cache.insert([5, 6, 7], row[:3])
    row.zero_()
    assert cache.match_prefix([5, 6, 7]).indices.tolist() == expected


def test_insert_length_mismatch_rejected() -> None:
    _, cache = make()
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], slots(1, 2))


def test_eviction_is_lru_over_leaves() -> None:
    alloc, cache = make()
    a = put(alloc, cache, [1, 2, 3])
    b = put(alloc, cache, [4, 5])
    cache.match_prefix([1, 2, 3])        # a is now the most recently used
    assert cache.evict(1) == 2            # whole leaf b goes first
    assert cache.match_prefix([4, 5]).indices.numel() == 0
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == a.tolist()
    del b

    alloc, cache = make()
    a = put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [4, 5])
    cache.match_prefix([4])               # touch b instead: a goes first
    assert cache.evict(1) == 3
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 0
    assert cache.match_prefix([4, 5]).indices.numel() == 2


def test_parent_becomes_evictable_after_its_children() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4])
    put(alloc, cache, [1, 2, 7, 8])        # splits into [1,2] -> {[3,4], [7,8]}
    put(alloc, cache, [9])
    cache.match_prefix([9])                # [9] is newest; the [1,2] subtree is older
    assert cache.evict(5) == 6             # [3,4], [7,8], then parent [1,2]
    assert cache.total_size() == 1 and cache.match_prefix([9]).indices.numel() == 1
    assert alloc.available() == 63
    check_sizes(cache)


def test_locked_nodes_and_ancestors_never_evicted() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4])
    put(alloc, cache, [1, 2, 7, 8])
    put(alloc, cache, [5, 6])
    leaf = cache.match_prefix([1, 2, 3, 4]).last_node
    assert (cache.evictable_size(), cache.protected_size()) == (8, 0)
    cache.inc_lock_ref(leaf)
    assert (cache.evictable_size(), cache.protected_size()) == (4, 4)   # [3,4] and ancestor [1,2]
    cache.inc_lock_ref(leaf)                                             # second holder: no change
    assert (cache.evictable_size(), cache.protected_size()) == (4, 4)
    check_sizes(cache)

    assert cache.evict(100) == 4          # only [7,8] and [5,6]
    assert cache.match_prefix([1, 2, 3, 4]).indices.numel() == 4
    assert cache.match_prefix([1, 2, 7]).indices.numel() == 2
    assert cache.evict(100) == 0
    assert (cache.evictable_size(), cache.protected_size()) == (0, 4)

    cache.dec_lock_ref(leaf)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 4)
    cache.dec_lock_ref(leaf)
    assert (cache.evictable_size(), cache.protected_size()) == (4, 0)
    check_sizes(cache)
    assert cache.evict(100) == 4 and cache.total_size() == 0
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(leaf)


def test_evict_returns_slots_to_allocator() -> None:
    alloc, cache = make(16)
    put(alloc, cache, [1, 2, 3, 4, 5])
    put(alloc, cache, [6, 7, 8])
    assert alloc.available() == 8
    assert cache.evict(3) >= 3
    assert alloc.available() + cache.total_size() == 16
    assert alloc.available() > 8
    got = alloc.alloc(alloc.available())
    assert got is not None and set(got.tolist()).isdisjoint(tree_slots(cache))


def test_flush_refused_while_locked_then_frees_everything() -> None:
    alloc, cache = make(32)
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 2, 4, 5])
    node = cache.match_prefix([1, 2, 4, 5]).last_node
    cache.inc_lock_ref(node)
    before = (cache.total_size(), alloc.available(), cache.pretty())
    assert cache.flush() is False
    assert (cache.total_size(), alloc.available(), cache.pretty()) == before
    cache.dec_lock_ref(node)
    assert cache.flush() is True
    assert cache.total_size() == 0 and not cache.root.children
    assert alloc.available() == 32
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 0


def test_pretty_shows_structure() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 2, 9])
    text = cache.pretty()
    assert "[1, 2]" in text and "[3]" in text and "[9]" in text


def test_randomized_against_shadow() -> None:
    rng = random.Random(1234)
    size = 120
    alloc, cache = make(size)
    shadow: dict[tuple[int, ...], int] = {}   # prefix -> slot of its last token
    locked: list[TreeNode] = []

    def check_invariants() -> None:
        assert alloc.available() + cache.total_size() == size
        held = tree_slots(cache)
        assert len(held) == len(set(held)) and 0 not in held
        check_sizes(cache)

    for _ in range(3000):
        key = [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        op = rng.random()
        if op < 0.45:
            m = cache.match_prefix(key)
            if m.indices.numel() + alloc.available() < len(key):
                cache.evict(len(key) - alloc.available())
            m = cache.match_prefix(key)       # eviction may have dropped part of the match
            need = len(key) - m.indices.numel()
            fresh = alloc.alloc(need)
            if fresh is None:                 # too much is locked; skip this request
                continue
            value = torch.cat([m.indices, fresh])
            present = cache.insert(key, value)
            assert present == m.indices.numel()
            # the matched part was the tree's own slots, so nothing to free here
            for i in range(len(key)):
                prefix = tuple(key[: i + 1])
                if i < present:
                    assert shadow[prefix] == value[i].item()
                else:
                    shadow[prefix] = value[i].item()
        elif op < 0.55:
            # insert with entirely fresh slots: the caller frees the duplicates
            fresh = alloc.alloc(len(key))
            if fresh is None:
                cache.evict(len(key))
                continue
            present = cache.insert(key, fresh)
            alloc.free(fresh[:present])
            for i in range(present, len(key)):
                shadow[tuple(key[: i + 1])] = fresh[i].item()
        elif op < 0.8:
            m = cache.match_prefix(key)
            got = m.indices.tolist()
            assert got == [shadow[tuple(key[: i + 1])] for i in range(len(got))]
            node, depth = m.last_node, 0
            while node is not cache.root:
                depth += len(node.key)
                assert node.parent is not None
                node = node.parent
            assert depth == len(got)
            if rng.random() < 0.3 and m.last_node is not cache.root:
                cache.inc_lock_ref(m.last_node)
                locked.append(m.last_node)
        elif op < 0.9 and locked:
            cache.dec_lock_ref(locked.pop(rng.randrange(len(locked))))
        else:
            before = alloc.available()
            freed = cache.evict(rng.randint(1, 20))
            assert alloc.available() == before + freed
        check_invariants()

    assert cache.flush() is (not locked)
    for node in locked:
        cache.dec_lock_ref(node)
    assert cache.protected_size() == 0
    assert cache.flush() is True
    assert alloc.available() == size and cache.total_size() == 0
