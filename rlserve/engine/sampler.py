"""Token sampling: penalties, bans, temperature, min-p/top-k/top-p, seeded draws and logprobs.

Everything is vectorised over the batch; the only per-row Python work is drawing one number from
the row's random stream, a host-side `random.Random` (the request's own when it carries a seed, else
the sampler's), copied to the device with the step's other per-row values. On a GPU, rows without
top-k/top-p/min-p take the Gumbel-max kernel keyed by that number. The other rows, and seeded rows on
a CPU, take inverse-CDF sampling at that number: over the vocabulary as it is for rows without
filters (no sort needed), over their probabilities sorted in descending order for the others.
Either way a seeded row's token depends only on its seed, how many draws its stream has made, and its
own logits -- never on the other rows of the batch.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlserve.engine.transfer import to_device
from rlserve.layers.gumbel import HAS_TRITON, gumbel_argmax
from rlserve.sampling import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    generator: random.Random | None    # the request's seeded stream; None → the sampler's
    prompt_ids: Sequence[int] = ()      # for repetition_penalty
    output_ids: Sequence[int] = ()      # for all penalties
    banned_ids: Sequence[int] = ()      # e.g. EOS while min_tokens isn't reached
    # Which paths the row can take, decided once: a step asks for every row of the batch.
    greedy_only: bool = field(init=False)   # a plain argmax: greedy, no penalties, nothing banned
    one_pass: bool = field(init=False)      # the one-pass Gumbel kernel: no filters either

    def __post_init__(self) -> None:
        p = self.params
        plain = not has_penalties(p) and not len(self.banned_ids)
        self.greedy_only = plain and p.greedy
        self.one_pass = plain and (p.greedy or _unfiltered(self))


@dataclass
class SampleOutput:
    token_ids: list[int]
    # Per row: None unless params.logprobs is set; else {sampled: lp, then top alternatives}.
    logprobs: list[dict[int, float] | None] = field(default_factory=list)


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _row_token_index(token_lists: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for scattering per-row token lists onto a [B, V] tensor."""
    rows = [i for i, toks in enumerate(token_lists) for _ in range(len(toks))]
    toks = [t for ts in token_lists for t in ts]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(toks, dtype=torch.long, device=device))


# The largest logit a repetition penalty may produce: far above any real logit, and still finite after
# division by a small temperature.
PENALISED_MAX = 1e30


def _float32_copy(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy to change in place: logits arrive in the model's dtype, so widening already copies."""
    return logits.float() if logits.dtype != torch.float32 else logits.clone()


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition (HF: over prompt+output), then frequency and presence (OpenAI: output only).

    Returns a new float32 tensor; `logits` is not modified.
    """
    logits = _float32_copy(logits)
    B, V = logits.shape
    dev = logits.device
    params = [r.params for r in rows]

    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if (rep != 1.0).any():
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        lists = [list(r.prompt_ids) + list(r.output_ids) if r.params.repetition_penalty != 1.0 else []
                 for r in rows]
        ri, ti = _row_token_index(lists, dev)
        seen[ri, ti] = True
        # A penalty below float32's range (5e-324 arrives as 0) or a tiny one would divide into inf and,
        # through softmax, NaN: the penalty is kept normal and the divided logits finite.
        rep = rep.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        penalised = torch.where(logits > 0, (logits / rep).clamp(max=PENALISED_MAX), logits * rep)
        logits = torch.where(seen, penalised, logits)

    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)
    if (freq != 0).any() or (pres != 0).any():
        counts = torch.zeros(B, V, dtype=torch.float32, device=dev)
        outputs = [r.output_ids if (r.params.frequency_penalty or r.params.presence_penalty) else ()
                   for r in rows]
        ri, ti = _row_token_index(outputs, dev)
        counts.index_put_((ri, ti), torch.ones_like(ti, dtype=torch.float32), accumulate=True)
        logits -= freq[:, None] * counts + pres[:, None] * (counts > 0).float()
    return logits


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first index of its largest value, as argmax). On a CPU `max` finds the same
    index in less than half of argmax's time (32 x 49,152 float32 logits: 0.42 against 1.09 ms)."""
    return logits.max(dim=-1).indices if logits.device.type == "cpu" else logits.argmax(dim=-1)


def add_logit_bias(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """A float32 copy of `logits` with each row's logit_bias added. Every path (argmax, the Gumbel kernel,
    inverse CDF) then samples from the biased logits; a batch without biases never gets here."""
    logits = _float32_copy(logits)
    lists = [sorted(r.params.logit_bias.items()) if r.params.logit_bias else [] for r in rows]
    ri, ti = _row_token_index([[t for t, _ in kv] for kv in lists], logits.device)
    bias = torch.tensor([b for kv in lists for _, b in kv], dtype=torch.float32).to(logits.device)
    logits.index_put_((ri, ti), bias, accumulate=True)
    return logits


def _ban(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    if any(len(r.banned_ids) for r in rows):
        ri, ti = _row_token_index([r.banned_ids for r in rows], logits.device)
        logits[ri, ti] = float("-inf")
    return logits


def _temperature_probs(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T) per row. Subtracting the max first keeps tiny temperatures finite: the top
    logit becomes exactly 0."""
    return torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None], dim=-1)


def _filtered_sorted_probs(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then min-p → top-k → top-p. Returns (probs, token ids), both [B, W] sorted by
    descending probability, with filtered-out probabilities set to 0: W = V, or on a CPU only the most
    likely CPU_CANDIDATES tokens when they hold every row's answer (see _filter_candidates).

    Each filter keeps a prefix of the sorted order, so the result is a per-row kept count.
    """
    B, V = logits.shape
    dev = logits.device
    params = [r.params for r in rows]
    temps = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, dev)
    probs = _temperature_probs(logits, temps)
    if dev.type != "cpu" or V <= 4 * CPU_CANDIDATES:
        sorted_probs, ids = probs.sort(dim=-1, descending=True, stable=True)
        return _keep_prefix(sorted_probs, params, V), ids
    kept, ids, served = _filter_candidates(probs, params)
    if bool(served.all()):
        return kept, ids
    # Rows whose kept prefix may run past the candidates sort their whole row; the others keep their
    # candidates, padded with zero probability.
    rest = (~served).nonzero().squeeze(-1)
    sorted_probs, sorted_ids = probs[rest].sort(dim=-1, descending=True, stable=True)
    out_probs = torch.zeros_like(probs)
    out_ids = torch.zeros(probs.shape, dtype=torch.int64)
    out_probs[:, :CPU_CANDIDATES] = kept
    out_ids[:, :CPU_CANDIDATES] = ids
    out_probs[rest] = _keep_prefix(sorted_probs, [params[i] for i in rest.tolist()], V)
    out_ids[rest] = sorted_ids
    return out_probs, out_ids


def _keep_prefix(probs: torch.Tensor, params: list[SamplingParams], V: int,
                 total: torch.Tensor | None = None) -> torch.Tensor:
    """Zero all but each row's kept prefix of its probabilities sorted in descending order. `total`:
    the mass that min-p and top-k leave in the whole row, where `probs` holds only its first tokens."""
    dev = probs.device
    min_p = to_device([p.min_p for p in params], torch.float32, dev)
    top_k = to_device([p.top_k if p.top_k > 0 else V for p in params], torch.int64, dev)
    top_p = to_device([p.top_p for p in params], torch.float32, dev)

    keep = (probs >= min_p[:, None] * probs[:, :1]).sum(dim=-1)
    keep = torch.minimum(keep, top_k)
    ranks = torch.arange(probs.shape[1], device=dev)[None, :]
    probs = probs.masked_fill(ranks >= keep[:, None], 0.0)
    # top-p over what min-p/top-k left: keep a token while the mass strictly before it is < top_p.
    cum = probs.cumsum(dim=-1)
    mass_before = (cum - probs) / (cum[:, -1:] if total is None else total[:, None])
    keep = torch.minimum(keep, (mass_before < top_p[:, None]).sum(dim=-1))
    keep = keep.clamp(min=1)  # the argmax always survives
    return probs.masked_fill(ranks >= keep[:, None], 0.0)


def _filter_candidates(probs: torch.Tensor, params: list[SamplingParams]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filters over each row's CPU_CANDIDATES most likely tokens only (a CPU sorts a vocabulary
    slowly: 150 ms for 64 rows of 49,152). Returns (kept probs, token ids, served): `served` marks the
    rows where that is the full sort's answer: no min-p, a top-k within the candidates or none, and a
    kept prefix that ends before the last candidate."""
    V = probs.shape[1]
    vals, ids = probs.topk(CPU_CANDIDATES, dim=-1)
    # What min-p and top-k leave of the whole row: its top-k candidates, or every token.
    k = to_device([p.top_k if 0 < p.top_k <= CPU_CANDIDATES else 0 for p in params], torch.int64, probs.device)
    top_mass = vals.cumsum(dim=-1).gather(-1, (k - 1).clamp(min=0)[:, None]).squeeze(-1)
    total = torch.where(k > 0, top_mass, probs.sum(dim=-1))
    kept = _keep_prefix(vals, params, V, total)
    simple = torch.tensor([p.min_p == 0 and not CPU_CANDIDATES < p.top_k < V for p in params])
    return kept, ids, simple & (kept[:, -1] == 0)


# On a CPU, filtered rows first try their most likely tokens only (_filter_candidates).
CPU_CANDIDATES = 1024


def _unfiltered(row: SampleRow) -> bool:
    p = row.params
    return p.top_k == -1 and p.top_p == 1.0 and p.min_p == 0.0


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._stream = random.Random(seed)   # unseeded rows' numbers
        self._fused = self.device.type == "cuda" and HAS_TRITON
        self._temps: tuple[list[float], torch.Tensor] | None = None   # the last Gumbel batch's, on the device

    def make_generator(self, seed: int) -> random.Random:
        """A request's own random stream, for rows whose params carry a seed. It lives on the host, so
        a step draws every row's number without a device launch per row."""
        return random.Random(seed)

    def get_state(self) -> dict[str, Any]:
        """The unseeded rows' random state (checkpointed with a training run)."""
        return {"stream": self._stream.getstate()}

    def set_state(self, state: dict[str, Any] | torch.Tensor) -> None:
        """Restore get_state()'s result. Older checkpoints also hold a torch generator's state (a dict
        with "generator", or that tensor alone), which no draw uses any more: it is ignored."""
        if isinstance(state, dict) and "stream" in state:
            self._stream.setstate(state["stream"])

    def _row_seeds(self, rows: list[SampleRow], device: torch.device) -> torch.Tensor:
        """The Gumbel kernel's per-row Philox seeds, one draw from each row's stream."""
        return to_device([(r.generator or self._stream).getrandbits(31) for r in rows], torch.int64, device)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleOutput:
        ids = self.sample_tensor(logits, rows).tolist()
        ks = [r.params.logprobs for r in rows]
        if all(k is None for k in ks):
            return SampleOutput(ids, [None] * len(rows))
        return SampleOutput(ids, self._logprobs(logprob_logits(logits, [r.params for r in rows]), ids, ks))

    def fuses_bitmask(self, rows: list[SampleRow]) -> bool:
        """Whether sample_tensor can take a grammar bitmask for these rows (inside the one-pass kernel)
        instead of having it applied to the logits first."""
        return self._fused and all(r.one_pass for r in rows)

    def sample_tensor(self, logits: torch.Tensor, rows: list[SampleRow],
                      bitmask: torch.Tensor | None = None) -> torch.Tensor:
        """The sampled ids as a device tensor, without waiting for the device (no logprobs). A grammar
        bitmask (xgrammar's packed layout, on the device) is taken only where fuses_bitmask(rows)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        if any(r.params.logit_bias for r in rows):
            logits = add_logit_bias(logits, rows)
        if bitmask is not None:
            if not self.fuses_bitmask(rows):
                raise ValueError("these rows can't take a bitmask in the sampling kernel: mask the logits")
            return self._gumbel(logits, rows, bitmask)
        if all(r.greedy_only for r in rows):
            token_ids = greedy_ids(logits)
        elif self.fuses_bitmask(rows):
            # Rows without filters (greedy ones too): one fused launch, logits read once.
            token_ids = self._gumbel(logits, rows)
        else:
            if any(has_penalties(r.params) for r in rows):
                logits = apply_penalties(logits, rows)
            elif any(len(r.banned_ids) for r in rows):
                logits = _float32_copy(logits)            # _ban writes into it
            else:
                logits = logits.float()                   # read only: no copy of float32 logits
            logits = _ban(logits, rows)
            random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
            # Greedy rows take the argmax; a batch of random rows only skips that pass.
            greedy = greedy_ids(logits) if len(random_rows) < len(rows) else None
            # Rows without filters take one batched draw that needs no sort: the Gumbel kernel on a GPU,
            # else inverse CDF in vocabulary order (on a CPU 30-50x cheaper than a noise value per
            # token). Each row keys it with its own number. The rest need a sorted distribution.
            plain = [i for i in random_rows if _unfiltered(rows[i])]
            chosen = set(plain)
            other = [i for i in random_rows if i not in chosen]
            draw_plain = self._gumbel if self._fused else self._draw
            if len(plain) == len(rows):              # the common case: no gather/scatter needed
                return draw_plain(logits, rows)
            token_ids = greedy if greedy is not None else torch.empty(len(rows), dtype=torch.int64,
                                                                      device=logits.device)
            if plain:
                sel = to_device(plain, torch.int64, logits.device)
                token_ids[sel] = draw_plain(logits[sel], [rows[i] for i in plain])
            if other:
                sel = to_device(other, torch.int64, logits.device)
                token_ids[sel] = self._draw(logits[sel], [rows[i] for i in other])
        return token_ids

    def _gumbel(self, logits: torch.Tensor, rows: list[SampleRow],
                bitmask: torch.Tensor | None = None) -> torch.Tensor:
        temps = [0.0 if r.params.greedy else r.params.temperature for r in rows]
        # Decode steps mostly repeat the last batch's rows: reuse its temperatures on the device
        # (a host-to-device copy costs the host more than comparing the lists).
        if self._temps is None or self._temps[0] != temps or self._temps[1].device != logits.device:
            self._temps = (temps, to_device(temps, torch.float32, logits.device))
        return gumbel_argmax(logits, self._temps[1], self._row_seeds(rows, logits.device), bitmask)

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Inverse-CDF draw with each row's own uniform. Filters keep a prefix of the sorted order, so
        filtered rows sort; rows without filters (on a CPU) draw over the vocabulary order
        as it is: the same distribution without a sort, which costs more than the rest of the draw."""
        sorted_ids = None
        if all(_unfiltered(r) for r in rows):
            temps = to_device([r.params.temperature for r in rows], torch.float32, logits.device)
            probs = _temperature_probs(logits, temps)
        else:
            probs, sorted_ids = _filtered_sorted_probs(logits, rows)
        u = to_device([(r.generator or self._stream).random() for r in rows], torch.float32, logits.device)
        cdf = probs.cumsum(dim=-1)
        target = (u * cdf[:, -1]).unsqueeze(-1)
        pos = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        # u * total may round up to total, past every token: clamp to the first token where the cdf
        # reaches the total, which has probability > 0 (the cdf rises there). searchsorted never lands
        # on a zero-probability token otherwise: its cdf equals its predecessor's.
        pos = torch.minimum(pos, torch.searchsorted(cdf, cdf[:, -1:].contiguous()).squeeze(-1))
        return pos if sorted_ids is None else sorted_ids.gather(-1, pos[:, None]).squeeze(-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, ids: list[int], ks: list[int | None]) -> list[dict[int, float] | None]:
        want = [i for i, k in enumerate(ks) if k is not None]
        out: list[dict[int, float] | None] = [None] * len(ks)
        if want:
            sel = torch.tensor(want, device=raw.device)
            picked = torch.tensor([ids[i] for i in want], device=raw.device)
            k_want = [k for k in ks if k is not None]     # (want's order)
            dicts = logprob_dicts(logprob_tensors(raw[sel], picked, max(k_want)), k_want)
            for i, d in zip(want, dicts):
                out[i] = d
        return out


def logprob_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The float32 logits whose log-softmax each row reports: divided by the temperature for rows that
    ask for `logprobs_mode="tempered"` (and sample), as they are."""
    logits = logits.float()
    temps = [p.temperature if p.logprobs_mode == "tempered" and not p.greedy else 1.0 for p in params]
    if any(t != 1.0 for t in temps):
        logits = logits / to_device(temps, torch.float32, logits.device)[:, None]
    return logits


def logprob_tensors(logits: torch.Tensor, picked: torch.Tensor, k_max: int) -> tuple[torch.Tensor, ...]:
    """Device tensors (picked ids, their logprobs, top-k logprobs, top-k ids); no host sync."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = lp.topk(k_max, dim=-1)
    return picked, lp.gather(-1, picked[:, None]).squeeze(-1), top_lp, top_ids


def logprob_dicts(tensors: tuple[torch.Tensor, ...], ks: list[int]) -> list[dict[int, float]]:
    """Row r: {picked[r]: lp, then the top ks[r] tokens by descending lp}."""
    picked, picked_lp, top_lp, top_ids = (t.tolist() for t in tensors)
    out = []
    for tok, tlp, k, alt_ids, alt_lps in zip(picked, picked_lp, ks, top_ids, top_lp):
        d = {tok: tlp}
        for a, alp in zip(alt_ids[:k], alt_lps[:k]):
            d.setdefault(a, alp)
        out.append(d)
    return out


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int] | torch.Tensor, k: int) -> list[dict[int, float]]:
    """logits[t] predicts next_ids[t]; same dict convention as SampleOutput.logprobs."""
    picked = torch.as_tensor(next_ids, dtype=torch.long, device=logits.device)
    return logprob_dicts(logprob_tensors(logits, picked, k), [k] * picked.numel())
