"""Turns a scheduled batch into tensors, runs the model, returns the logits the sampler needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlserve.engine.cache import ReqToTokenPool
from rlserve.engine.scheduler import ScheduledBatch
from rlserve.engine.transfer import pack_to_device
from rlserve.layers.attention.base import ForwardBatch
from rlserve.models.llama import LlamaForCausalLM


@dataclass
class ForwardResult:
    next_logits: torch.Tensor                   # [R, V]: one row per request that samples this step
    sampling_reqs: list                         # the requests those rows belong to
    prompt_logits: dict[int, torch.Tensor]      # id(req) → [chunk, V] logits over its prefilled tokens


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, table: ReqToTokenPool, device: torch.device) -> None:
        self.model = model
        self.table = table
        self.device = device
        self.graphs = None            # a CudaGraphRunner once captured

    def capture_cuda_graphs(self, pad_row: int, max_bs: int) -> None:
        from rlserve.engine.cuda_graph import CudaGraphRunner
        self.graphs = CudaGraphRunner(self.model, self.table.table, pad_row, max_bs)

    def build(self, sb: ScheduledBatch, decode_slots: torch.Tensor | None,
              input_ids: torch.Tensor | None = None) -> tuple[ForwardBatch, list, list]:
        ids: list[int] = []
        positions: list[int] = []
        extend_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[int] = []          # flat index of each sampled position
        sampling_reqs = []
        prompt_spans = []                   # (req, start, length) of prompt-logprob spans
        out_loc: list[torch.Tensor] = []
        table = self.table.table
        for i, req in enumerate(sb.reqs):
            if sb.is_decode:
                start, n = req.kv_len, 1
                if input_ids is None:
                    ids.append(req.output_ids[-1])
            else:
                start, n = req.kv_len, req.chunk_len
                ids.extend(req.fill_ids[start:start + n])
                out_loc.append(table[req.row, start:start + n])
                if req.params.prompt_logprobs is not None and not req.output_ids:
                    prompt_spans.append((req, len(positions), n))
            positions.extend(range(start, start + n))
            extend_lens.append(n)
            seq_lens.append(start + n)
            if sb.is_decode or sb.completes[i]:
                logit_rows.append(len(positions) - 1)
                sampling_reqs.append(req)
        dev = self.device
        decode_ids = [] if input_ids is not None else ids
        t_ids, t_pos, t_rows, t_seq, t_ext, t_logit = pack_to_device(
            [decode_ids, positions, [r.row for r in sb.reqs], seq_lens, extend_lens, logit_rows], dev)
        if sb.is_decode:
            table[t_rows, t_pos] = decode_slots       # decode writes at position == kv_len
        loc = decode_slots if sb.is_decode else torch.cat(out_loc)
        fb = ForwardBatch(
            input_ids=input_ids if input_ids is not None else t_ids,
            positions=t_pos, out_cache_loc=loc, req_rows=t_rows, seq_lens=t_seq, extend_lens=t_ext,
            seq_lens_cpu=seq_lens, extend_lens_cpu=extend_lens, is_decode=sb.is_decode,
            logits_indices=t_logit, req_to_token=table,
        )
        return fb, sampling_reqs, prompt_spans

    @torch.inference_mode()
    def forward(self, sb: ScheduledBatch, decode_slots: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> ForwardResult:
        """input_ids: decode inputs still on the device (the previous step's samples, overlapped)."""
        fb, sampling_reqs, prompt_spans = self.build(sb, decode_slots, input_ids)
        if self.graphs is not None and self.graphs.can_run(fb):
            return ForwardResult(self.graphs.run(fb), sampling_reqs, {})
        self.model.attn_backend.prepare(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        logits = self.model.compute_logits(hidden[fb.logits_indices]) if sampling_reqs else None
        prompt_logits = {id(req): self.model.compute_logits(hidden[s:s + n]) for req, s, n in prompt_spans}
        return ForwardResult(logits, sampling_reqs, prompt_logits)
