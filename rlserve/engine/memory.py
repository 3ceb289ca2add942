"""KV bookkeeping for requests: the slot allocator, the request-to-token table and the radix cache
working together. Every slot is owned by exactly one of: the free list, the tree, or one request."""
from __future__ import annotations

import torch

from rlserve.engine.cache import RadixCache, ReqToTokenPool, TokenAllocator
from rlserve.engine.request import Request
from rlserve.engine.transfer import to_device

# Decode slots a request takes at a time while the pool has room. One slot per request per step would
# interleave the batch's new tokens in the pool; a run of them keeps each request's tokens side by side,
# which the decode attention kernel reads faster.
DECODE_RESERVE = 16


class RequestMemory:
    def __init__(self, allocator: TokenAllocator, table: ReqToTokenPool, tree: RadixCache | None) -> None:
        self.allocator = allocator
        self.table = table
        self.tree = tree                      # None when the prefix cache is disabled
        rows = table.table.shape[0]
        # A table row's reserved decode slots fill the row's last `reserve_left[row]` columns here.
        self.reserve = torch.zeros(rows, DECODE_RESERVE, dtype=torch.int64, device=table.table.device)
        self.reserve_left = [0] * rows

    def available_tokens(self) -> int:
        """Slots obtainable now: free ones plus those the tree could give up."""
        return self.allocator.available() + (self.tree.evictable_size() if self.tree else 0)

    def alloc_tokens(self, n: int) -> torch.Tensor | None:
        if self.allocator.available() < n and self.tree is not None:
            self.tree.evict(n - self.allocator.available())
        return self.allocator.alloc(n)

    def decode_need(self, reqs: list[Request]) -> int:
        """Free slots a decode step of `reqs` needs: one for each request with no reserved slot left."""
        left = self.reserve_left
        return sum(1 for r in reqs if not left[r.row])  # type: ignore[index,misc]  # scheduled: rows are set

    def alloc_decode(self, reqs: list[Request]) -> torch.Tensor | None:
        """One slot for each request's next token, from its reserved run; requests that have used theirs
        up take a new run (a single slot when free slots are short, so reserving never evicts the prefix
        cache nor starves a request). None when the pool can't give every request a slot."""
        P, left = DECODE_RESERVE, self.reserve_left
        rows: list[int] = [r.row for r in reqs]  # type: ignore[misc]  # scheduled requests hold a row
        need = [row for row in rows if not left[row]]
        if need:
            per = P if self.allocator.available() >= len(need) * P + len(reqs) else 1
            fresh = self.alloc_tokens(len(need) * per)
            if fresh is None:
                return None
            device = self.reserve.device
            self.reserve[to_device(need, torch.int64, device), P - per:] = fresh.view(len(need), per)
            for row in need:
                left[row] = per
        flat = [row * P + P - left[row] for row in rows]
        for row in rows:
            left[row] -= 1
        return self.reserve.view(-1)[to_device(flat, torch.int64, self.reserve.device)]

    def _free_reserved(self, row: int) -> None:
        n = self.reserve_left[row]
        if n:
            self.allocator.free(self.reserve[row, DECODE_RESERVE - n:].clone())
            self.reserve_left[row] = 0

    def match_and_lock(self, req: Request, use_cache: bool) -> int:
        """Give the request a table row and its cached prefix (never the whole fill: one token must be
        computed to get logits). Returns the prefix length."""
        if req.row is None:
            req.row = self.table.alloc()
            if req.row is None:
                raise MemoryError("no free request rows")
        if self.tree is None or not use_cache:
            req.kv_len = req.cached_len = 0
            return 0
        match = self.tree.match_prefix(req.fill_ids[:-1])
        n = len(match.indices)
        self.table.table[req.row, :n] = match.indices
        self.tree.inc_lock_ref(match.last_node)
        req.last_node, req.kv_len, req.cached_len = match.last_node, n, n
        return n

    def unlock(self, req: Request) -> None:
        if self.tree is not None and req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = None

    def cache_written(self, req: Request) -> None:
        """Hand the request's written KV to the tree (it learns a prefix only once its KV exists), then
        point the request's row at the tree's slots and move its lock down to the new node."""
        # With overlapped decode, the KV of a token the host hasn't seen yet may exist: it stays the
        # request's own until release.
        n = min(req.kv_len, req.num_tokens)
        if self.tree is None or n <= req.cached_len:
            return
        key = req.fill_ids[:n]
        row = self.table.table[req.row]
        already = self.tree.insert(key, row[:n].clone())
        if already > req.cached_len:       # another request cached these meanwhile: drop our copies
            self.allocator.free(row[req.cached_len:already].clone())
        match = self.tree.match_prefix(key)
        row[:n] = match.indices
        self.tree.inc_lock_ref(match.last_node)
        self.unlock(req)
        req.last_node, req.cached_len = match.last_node, n

    def release(self, req: Request, cache: bool) -> None:
        """Free everything the request holds. With cache=True its written KV first goes to the tree."""
        if req.row is None:
            return
        if cache:
            self.cache_written(req)
        row = self.table.table[req.row]
        if req.kv_len > req.cached_len:
            self.allocator.free(row[req.cached_len:req.kv_len].clone())
        self._free_reserved(req.row)
        self.unlock(req)
        self.table.free(req.row)
        req.row, req.kv_len, req.cached_len = None, 0, 0

    def leaked(self, live: list[Request]) -> int:
        """Slots unaccounted for: 0 when every slot is free, in the tree, or owned by a live request."""
        owned = sum(r.kv_len - r.cached_len for r in live if r.row is not None)
        in_tree = self.tree.total_size() if self.tree else 0
        reserved = sum(self.reserve_left[r.row] for r in live if r.row is not None)
        return self.allocator.size - self.allocator.available() - in_tree - owned - reserved
