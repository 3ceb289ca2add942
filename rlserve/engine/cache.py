"""KV memory bookkeeping: slot allocator, request→slot table, and the radix prefix cache (the KV
buffers themselves are rlserve.kv_pool).

A "slot" is one token's K/V position in every layer's buffer. Slot 0 is never handed out: padded
positions in a batch write there, so it acts as a harmless sink.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch


class TokenAllocator:
    """Token-granularity free list over KV slots 1..size. Slot 0 is reserved as a padding sink."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError(f"allocator size must be positive, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._returned: list[torch.Tensor] = []   # freed chunks, merged into _free lazily
        self._num_free = self.size

    def available(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            return None
        if n > len(self._free):
            self._free = torch.cat([self._free, *self._returned])
            self._returned.clear()
        out, self._free = self._free[:n], self._free[n:]
        self._num_free -= n
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._returned.append(slots.reshape(-1).to(device=self.device, dtype=torch.int64))
        self._num_free += slots.numel()


class ReqToTokenPool:
    """Row per live request; table[row, :len] are the KV slots of that request's tokens."""

    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str) -> None:
        self.max_requests, self.max_context_len = max_requests, max_context_len
        self.table = torch.zeros((max_requests, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_requests - 1, -1, -1))   # pop() hands out row 0 first
        self._is_free = [True] * max_requests

    def alloc(self) -> int | None:
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        if not 0 <= row < self.max_requests or self._is_free[row]:
            raise ValueError(f"row {row} is not allocated")
        self._is_free[row] = True
        self._free_rows.append(row)

    def available(self) -> int:
        return len(self._free_rows)


@dataclass(eq=False)   # identity equality/hash: nodes are heap entries and dict values
class TreeNode:
    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, last_access={self.last_access})"


@dataclass
class MatchResult:
    indices: torch.Tensor   # int64 KV slots of the matched prefix
    last_node: TreeNode     # deepest node covering exactly the matched prefix (root if none)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """Radix tree over token ids whose values are KV slots (page size 1).

    lock_ref on a node counts the lock holders at or below it, so a node is evictable only when no
    live request uses it or any of its descendants.
    """

    def __init__(self, allocator: TokenAllocator) -> None:
        self.allocator = allocator
        self._clock = 0
        self._reset()

    def _reset(self) -> None:
        self.root = TreeNode(value=self._empty())
        self._evictable = 0
        self._protected = 0

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.allocator.device)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match_prefix(self, key: list[int]) -> MatchResult:
        now = self._tick()
        node, pos, values = self.root, 0, []
        while pos < len(key) and key[pos] in node.children:
            child = node.children[key[pos]]
            n = _common_prefix_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        indices = torch.cat(values) if values else self._empty()
        return MatchResult(indices=indices, last_node=node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        if len(key) != len(value):
            raise ValueError(f"key has {len(key)} tokens but value has {len(value)} slots")
        now = self._tick()
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                # clone: callers often pass a view of a ReqToTokenPool row that gets reused later
                leaf = TreeNode(key=list(key[pos:]), value=value[pos:].to(torch.int64).clone(),
                                parent=node, last_access=now)
                node.children[key[pos]] = leaf
                self._evictable += len(leaf.key)
                return pos
            n = _common_prefix_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child after its first n tokens; return the new upper node (sizes are unchanged)."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        # Every lock holder at or below child is below the new node too, so lock_ref carries over.
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=parent,
                         lock_ref=child.lock_ref, last_access=child.last_access)
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock_ref on a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            assert node.parent is not None
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        # The tie-breaking counter keeps heapq from ever comparing two TreeNodes.
        heap = [(leaf.last_access, i, leaf) for i, leaf in enumerate(self._leaves()) if leaf.lock_ref == 0]
        heapq.heapify(heap)
        seq, freed = len(heap), 0
        while heap and freed < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            self.allocator.free(leaf.value)
            del parent.children[leaf.key[0]]
            leaf.parent = None
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, seq, parent))
                seq += 1
        return freed

    def _leaves(self) -> list[TreeNode]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves

    def _nodes(self) -> list[TreeNode]:
        nodes, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def flush(self) -> bool:
        if self._protected > 0:
            return False
        for node in self._nodes():
            self.allocator.free(node.value)
        self._reset()
        return True

    def pretty(self) -> str:
        lines = [f"root (evictable={self._evictable}, protected={self._protected})"]

        def walk(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                shown = child.key if len(child.key) <= 8 else [*child.key[:8], "..."]
                lines.append(f"{'  ' * depth}{shown} len={len(child.key)} "
                             f"lock={child.lock_ref} t={child.last_access}")
                walk(child, depth + 1)

        walk(self.root, 1)
        return "\n".join(lines)
