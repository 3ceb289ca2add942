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

from rlserve.engine.transfer import pinned
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
        # A plain decode graph of size bs reads its ids, positions, table rows and lengths from its own
        # [4, bs] block, so a step fills them with one host-to-device copy (see replay_decode).
        self.step_inputs = {bs: torch.zeros(4, bs, dtype=torch.int64, device=dev) for bs in self.sizes}
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
        ids, positions, rows, seq_lens = self.input_ids, self.positions, self.req_rows, self.seq_lens
        if cascade:
            g = bs // 2
            shared = SharedPrefixes(self.members[:g], self.group_lengths[:g], self.group_rows[:g],
                                    self.starts[:bs], g, self.cascade_width)
        else:
            ids, positions, rows, seq_lens = self.step_inputs[bs]
            rows.fill_(self.pad_row)
            seq_lens.fill_(1)
        return ForwardBatch(
            input_ids=ids[:bs], positions=positions[:bs], out_cache_loc=self.out_loc[:bs],
            req_rows=rows[:bs], seq_lens=seq_lens[:bs], extend_lens=self.extend_lens[:bs],
            seq_lens_cpu=[1] * bs, extend_lens_cpu=[1] * bs, is_decode=True,
            logits_indices=torch.arange(bs, device=self.input_ids.device), req_to_token=self.req_to_token,
            shared_prefixes=shared)

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        # Each row's new slot goes into the req-to-token table inside the graph (a padded row writes
        # slot 0 into the all-zero pad row, which changes nothing).
        self.req_to_token[fb.req_rows, fb.positions] = fb.out_cache_loc
        backend = self.model.attn_backend
        assert backend is not None, "the engine attaches the backend before capturing"
        backend.prepare(fb)
        return self.model.compute_logits(self.model(fb.input_ids, fb.positions, fb), float32=False)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
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

    def padded_size(self, bs: int) -> int:
        return next(s for s in self.sizes if s >= bs)

    def replay_decode(self, reqs: list, slots: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """A plain (non-cascade) decode step straight from the requests: one copy of the host's
        integers, one of the new slots (and of the input ids when they are on the device), one replay.
        Returns the [len(reqs), V] logits."""
        bs = len(reqs)
        padded = self.padded_size(bs)
        pad = padded - bs
        positions = [r.kv_len for r in reqs]      # decode writes at position == kv_len
        ids = [0] * bs if input_ids is not None else [r.output_ids[-1] for r in reqs]
        inputs = self.step_inputs[padded]
        inputs.copy_(pinned([ids + [0] * pad, positions + [0] * pad, [r.row for r in reqs] + [self.pad_row] * pad,
                             [p + 1 for p in positions] + [1] * pad], torch.int64), non_blocking=True)
        if input_ids is not None:
            inputs[0, :bs].copy_(input_ids)
        self.out_loc[:bs].copy_(slots)
        if pad:
            self.out_loc[bs:padded].zero_()       # padded rows write their K/V into the sink slot
        self.graphs[(padded, False)].replay()
        return self.logits[(padded, False)][:bs]

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """A cascade decode step (plain ones take replay_decode) from its built batch tensors."""
        shared = fb.shared_prefixes
        assert shared is not None, "plain decode steps replay through replay_decode"
        bs = fb.batch_size
        padded = self.padded_size(bs)
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
        g, cap = shared.num_groups, padded // 2
        self.members[:g].copy_(shared.members)
        self.group_lengths[:g].copy_(shared.lengths)
        self.group_rows[:g].copy_(shared.rows)
        self.starts[:bs].copy_(shared.starts)
        if cap > g:                               # empty groups: no members, nothing to read
            self.members[g:cap].fill_(-1)
            self.group_lengths[g:cap].zero_()
            self.group_rows[g:cap].fill_(self.pad_row)
        if padded > bs:
            self.starts[bs:padded].zero_()
        self.cascade_replays += 1
        key = (padded, True)
        self.graphs[key].replay()
        return self.logits[key][:bs]
