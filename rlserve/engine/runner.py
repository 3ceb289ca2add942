"""Turns a scheduled batch into tensors, runs the model, returns the logits the sampler needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from rlserve.engine.cache import ReqToTokenPool
from rlserve.engine.pooling import pool
from rlserve.engine.prefix_groups import PrefixGroups, find_prefix_groups
from rlserve.engine.scheduler import ScheduledBatch
from rlserve.engine.transfer import pack_to_device
from rlserve.layers.attention.base import ForwardBatch, SharedPrefixes
from rlserve.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from rlserve.engine.cuda_graph import CudaGraphRunner
    from rlserve.engine.tp_plan import Workers

# A cascade step runs a second kernel per layer and pads its groups to the batch's capacity: use it only
# when the KV it avoids reading (this many bytes a step, ~0.15 ms of HBM on an H100) outweighs that.
CASCADE_MIN_SAVED_BYTES = 5 * 10**8


@dataclass
class ForwardResult:
    next_logits: torch.Tensor | None            # [R, V]: one row per request that samples this step (None: none)
    sampling_reqs: list                         # the requests those rows belong to
    prompt_logits: dict[int, torch.Tensor]      # id(req) → [chunk, V] logits over its prefilled tokens
    pooled: list = field(default_factory=list)  # pooling requests this step completed (engine/pooling.py)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, table: ReqToTokenPool, device: torch.device) -> None:
        self.model = model
        self.table = table
        self.device = device
        self.graphs: CudaGraphRunner | None = None
        self.cascade_max_members = 0  # > 0: decode batches may read shared prefixes once (cascade)
        self.cascade_min_saved_tokens = 0
        self._groups_key: tuple | None = None
        self._groups: PrefixGroups | None = None
        self.cascade_steps = 0        # decode steps that ran with shared prefixes
        self.tp_workers: Workers | None = None   # tensor parallelism: the ranks each forward is sent to first

    def enable_cascade(self, max_members: int, kv_bytes_per_token: int) -> None:
        self.cascade_max_members = max_members
        self.cascade_min_saved_tokens = -(-CASCADE_MIN_SAVED_BYTES // kv_bytes_per_token)

    def _prefix_groups(self, reqs: list) -> PrefixGroups | None:
        """The batch's shared-prefix groups, when they save enough; recomputed only when the batch's
        requests or their cached paths change (not on a plain decode step)."""
        key = tuple((r.rid, r.row, id(r.last_node)) for r in reqs)
        if key != self._groups_key:
            groups = find_prefix_groups(reqs, self.cascade_max_members)
            if groups is not None and groups.saved_tokens < self.cascade_min_saved_tokens:
                groups = None
            self._groups_key, self._groups = key, groups
        return self._groups

    def capture_cuda_graphs(self, pad_row: int, max_bs: int) -> None:
        from rlserve.engine.cuda_graph import CudaGraphRunner
        self.graphs = CudaGraphRunner(self.model, self.table.table, pad_row, max_bs, self.cascade_max_members)

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
            if sb.is_decode or (sb.completes[i] and req.pooling is None):
                logit_rows.append(len(positions) - 1)
                sampling_reqs.append(req)
        dev = self.device
        decode_ids = [] if input_ids is not None else ids
        groups = self._prefix_groups(sb.reqs) if sb.is_decode and self.cascade_max_members else None
        group_parts = []
        if groups is not None:
            width = self.cascade_max_members
            group_parts = [[i for m in groups.members for i in m + [-1] * (width - len(m))],
                           groups.lengths, groups.rows, groups.starts]
        t_ids, t_pos, t_rows, t_seq, t_ext, t_logit, *t_groups = pack_to_device(
            [decode_ids, positions, [r.row for r in sb.reqs], seq_lens, extend_lens, logit_rows,  # type: ignore[misc]
             *group_parts], dev)
        shared = None
        if groups is not None:
            members, lengths, rows, starts = t_groups
            shared = SharedPrefixes(members.view(len(groups.members), self.cascade_max_members), lengths, rows,
                                    starts, len(groups.members), self.cascade_max_members)
            self.cascade_steps += 1
        if sb.is_decode:
            assert decode_slots is not None, "a decode step writes into the slots it was given"
            table[t_rows, t_pos] = decode_slots       # decode writes at position == kv_len
            loc = decode_slots
        else:
            loc = torch.cat(out_loc)
        fb = ForwardBatch(
            input_ids=input_ids if input_ids is not None else t_ids,
            positions=t_pos, out_cache_loc=loc, req_rows=t_rows, seq_lens=t_seq, extend_lens=t_ext,
            seq_lens_cpu=seq_lens, extend_lens_cpu=extend_lens, is_decode=sb.is_decode,
            logits_indices=t_logit, req_to_token=table, shared_prefixes=shared,
        )
        return fb, sampling_reqs, prompt_spans

    @torch.inference_mode()
    def forward(self, sb: ScheduledBatch, decode_slots: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> ForwardResult:
        """input_ids: decode inputs still on the device (the previous step's samples, overlapped)."""
        graphs = self.graphs
        if sb.is_decode and graphs is not None and len(sb.reqs) <= graphs.max_bs and (
                not self.cascade_max_members or self._prefix_groups(sb.reqs) is None):
            # The common decode step: no batch tensors to build, the graph takes the requests as they are.
            return ForwardResult(graphs.replay_decode(sb.reqs, decode_slots, input_ids),  # type: ignore[arg-type]
                                 sb.reqs, {})                    # (a decode step always comes with its slots)
        fb, sampling_reqs, prompt_spans = self.build(sb, decode_slots, input_ids)
        if self.graphs is not None and self.graphs.can_run(fb):
            return ForwardResult(self.graphs.run(fb), sampling_reqs, {})
        if self.tp_workers is not None:
            rows = cast("list[int]", [r.row for r in sb.reqs])       # scheduled requests hold a row each
            self.tp_workers.send_forward(fb, rows, [(s, n) for _, s, n in prompt_spans], bool(sampling_reqs))
        self.model.attn_backend.prepare(fb)  # type: ignore[union-attr]  # the engine attached it
        hidden = self.model(fb.input_ids, fb.positions, fb)
        logits = self.model.compute_logits(hidden[fb.logits_indices], float32=False) if sampling_reqs else None
        prompt_logits = {id(req): self.model.compute_logits(hidden[s:s + n]) for req, s, n in prompt_spans}
        pooled = [] if sb.is_decode or all(r.pooling is None for r in sb.reqs) else pool(self.model, hidden, sb)
        return ForwardResult(logits, sampling_reqs, prompt_logits, pooled)
