"""CUDA graphs for decode: capture the whole forward once per batch size, replay with padding.

A decode step of a small model is dominated by kernel launches; replaying a captured graph turns
hundreds of launches into one. Batches are padded to the next captured size: padded rows read a
reserved all-zero table row (KV slot 0, the pool's padding sink) and write their K/V there.

With cascade attention on, each batch size gets a second graph whose decode also runs the shared-prefix
pass. Its group tables are static buffers sized for the most groups a batch can hold (batch / 2: a
group has at least two members); a step fills the groups it has and pads the rest with empty ones
(length 0, no members), which the kernel skips.
"""
from __future__ import annotations

import torch

from rlserve.layers.attention.base import ForwardBatch, SharedPrefixes
from rlserve.models.llama import LlamaForCausalLM


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [1]


class CudaGraphRunner:
    def __init__(self, model: LlamaForCausalLM, req_to_token: torch.Tensor, pad_row: int, max_bs: int,
                 cascade_width: int = 0) -> None:
        self.model = model
        self.req_to_token = req_to_token
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        dev = req_to_token.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_rows = torch.full((n,), pad_row, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=dev)
        self.extend_lens = torch.ones(n, dtype=torch.int64, device=dev)
        self.pad_row = pad_row
        self.cascade_width = cascade_width        # 0: no cascade graphs
        groups = n // 2
        self.members = torch.full((groups, max(cascade_width, 1)), -1, dtype=torch.int64, device=dev)
        self.group_lengths = torch.zeros(groups, dtype=torch.int64, device=dev)
        self.group_rows = torch.full((groups,), pad_row, dtype=torch.int64, device=dev)
        self.starts = torch.zeros(n, dtype=torch.int64, device=dev)
        self.cascade_replays = 0                  # replays of a cascade graph (tests, stats)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._capture_all()

    def _static_batch(self, bs: int, cascade: bool) -> ForwardBatch:
        shared = None
        if cascade:
            g = bs // 2
            shared = SharedPrefixes(self.members[:g], self.group_lengths[:g], self.group_rows[:g],
                                    self.starts[:bs], g, self.cascade_width)
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_loc[:bs],
            req_rows=self.req_rows[:bs], seq_lens=self.seq_lens[:bs], extend_lens=self.extend_lens[:bs],
            seq_lens_cpu=[1] * bs, extend_lens_cpu=[1] * bs, is_decode=True,
            logits_indices=torch.arange(bs, device=self.input_ids.device), req_to_token=self.req_to_token,
            shared_prefixes=shared)

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        self.model.attn_backend.prepare(fb)
        return self.model.compute_logits(self.model(fb.input_ids, fb.positions, fb), float32=False)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        keys = [(bs, False) for bs in self.sizes]
        if self.cascade_width:
            keys += [(bs, True) for bs in self.sizes if bs >= 2]
        for key in sorted(keys, reverse=True):    # largest first so smaller graphs reuse its memory
            fb = self._static_batch(*key)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                # warm up: autotuning and lazy allocations
                    self._forward(fb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[key] = self._forward(fb)
            # The first launch of a graph uploads it to the device, which costs far more than a replay:
            # do it here (the static inputs are harmless padding) rather than on the first real step.
            graph.replay()
            self.graphs[key] = graph
        torch.cuda.synchronize()

    def can_run(self, fb: ForwardBatch) -> bool:
        shared = fb.shared_prefixes
        if shared is not None and (not self.cascade_width or shared.max_members != self.cascade_width):
            return False
        return fb.is_decode and fb.batch_size <= self.max_bs

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        bs = fb.batch_size
        padded = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.out_loc[:bs].copy_(fb.out_cache_loc)
        self.req_rows[:bs].copy_(fb.req_rows)
        self.seq_lens[:bs].copy_(fb.seq_lens)
        if padded > bs:                           # padded rows: a one-token sequence in the sink
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_loc[bs:padded].zero_()
            self.req_rows[bs:padded].fill_(self.pad_row)
            self.seq_lens[bs:padded].fill_(1)
        shared = fb.shared_prefixes
        if shared is not None:
            g, cap = shared.num_groups, padded // 2
            self.members[:g].copy_(shared.members)
            self.group_lengths[:g].copy_(shared.lengths)
            self.group_rows[:g].copy_(shared.rows)
            self.starts[:bs].copy_(shared.starts)
            if cap > g:                           # empty groups: no members, nothing to read
                self.members[g:cap].fill_(-1)
                self.group_lengths[g:cap].zero_()
                self.group_rows[g:cap].fill_(self.pad_row)
            if padded > bs:
                self.starts[bs:padded].zero_()
            self.cascade_replays += 1
        key = (padded, shared is not None)
        self.graphs[key].replay()
        return self.logits[key][:bs]
