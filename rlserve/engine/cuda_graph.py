"""CUDA graphs for decode: capture the whole forward once per batch size, replay with padding.

A decode step of a small model is dominated by kernel launches; replaying a captured graph turns
hundreds of launches into one. Batches are padded to the next captured size: padded rows read a
reserved all-zero table row (KV slot 0, the pool's padding sink) and write their K/V there.
"""
from __future__ import annotations

import torch

from rlserve.layers.attention.base import ForwardBatch
from rlserve.models.llama import LlamaForCausalLM


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [1]


class CudaGraphRunner:
    def __init__(self, model: LlamaForCausalLM, req_to_token: torch.Tensor, pad_row: int, max_bs: int) -> None:
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_loc[:bs],
            req_rows=self.req_rows[:bs], seq_lens=self.seq_lens[:bs], extend_lens=self.extend_lens[:bs],
            seq_lens_cpu=[1] * bs, extend_lens_cpu=[1] * bs, is_decode=True,
            logits_indices=torch.arange(bs, device=self.input_ids.device), req_to_token=self.req_to_token)

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        self.model.attn_backend.prepare(fb)
        return self.model.compute_logits(self.model(fb.input_ids, fb.positions, fb))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):           # largest first so smaller graphs reuse its memory
            fb = self._static_batch(bs)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                # warm up: autotuning and lazy allocations
                    self._forward(fb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[bs] = self._forward(fb)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, fb: ForwardBatch) -> bool:
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
        self.graphs[padded].replay()
        return self.logits[padded][:bs]
