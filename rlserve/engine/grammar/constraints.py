"""Structured output as the step loop sees it: register a request's constraint, get the masks for a
batch's rows, hand over the tokens sampled under them.

Each constrained request has a matcher (xgrammar) here, keyed by the Request. In overlapped steps the
mask helper processes may fill the next step's masks while the loop takes the previous step's tokens:
`ask_helpers` starts them (they first advance their copies of the matchers by those tokens), and the
engine's own matchers for the helpers' rows take the tokens later, only when read (`lag`): a mask lets
a stop token through only where the grammar can end, so a stop token sampled under a helper's mask ends
its request without asking the lagging matcher. A lagging matcher that rejects a token its helper copy
took (the two disagreed) puts its request among `take_rejected()`, which the engine aborts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlserve.engine.grammar.backend import GrammarBackend
from rlserve.engine.grammar.spec import GrammarSpec
from rlserve.engine.request import Request
from rlserve.sampling import SamplingParams

REJECTED = ("abort", "grammar rejected the sampled token")
GRAMMAR_STOP = ("stop", None)
Ending = tuple[str, int | str | None]     # (finish reason, stop reason) the grammar gives a request


@dataclass
class _Row:
    """A constrained request's grammar state."""
    matcher: Any
    key: int | None                 # its helper copy's name; None when the engine fills its masks
    lag: list[int] = field(default_factory=list)   # tokens the helper copy took and `matcher` has not yet


@dataclass
class MaskTicket:
    """The helpers are filling a batch's masks: each row's helper key (None: a row they don't fill)."""
    keys: list[int | None]


@dataclass(frozen=True)
class GrammarStatus:
    constrained: int                 # live requests under a grammar
    helpers: int                     # helper processes in use (0: the engine fills every mask)
    helper_pids: tuple[int, ...]
    pinned: bool                     # the helpers' mask is page-locked: copied to a GPU asynchronously
    helper_requests: int             # batches of masks the helpers were asked to fill
    helper_busy_s: tuple[tuple[float, float], ...]   # per helper: seconds advancing matchers, filling rows
    helpers_given_up: int            # times the helpers failed, exited or stalled and the engine took over
    queued_on_device: int            # samplings queued behind a device-side wait for the helpers' answers
    lagging: tuple[str, ...]         # requests whose matcher is behind its helper copy


class Constraints:
    """The engine's structured output: compiled grammars, one matcher per constrained request, masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int], helpers: int, helper_rows: int,
                 pin: bool) -> None:
        self._args = (tokenizer, vocab_size, stop_ids, helpers, helper_rows, pin)
        self._backend: GrammarBackend | None = None      # made with the first constraint (imports xgrammar)
        self._rows: dict[Request, _Row] = {}
        self._rejected: list[Request] = []

    # ---- requests ----
    def start(self) -> GrammarBackend:
        """The compiler and the helper processes, started now (else with the first constraint)."""
        if self._backend is None:
            tokenizer, vocab_size, stop_ids, helpers, helper_rows, pin = self._args
            if tokenizer is None:
                raise ValueError("structured output needs a tokenizer; this model has none")
            self._backend = GrammarBackend(tokenizer, vocab_size, stop_ids, helpers=helpers,
                                           helper_rows=helper_rows, pin=pin)
        return self._backend

    def compile(self, params: SamplingParams) -> Any:
        """The compiled grammar for params' constraint (None if unconstrained); ValueError if invalid."""
        spec = GrammarSpec.from_params(params)
        return None if spec is None else self.start().compile(spec)

    def register(self, req: Request, compiled: Any) -> None:
        spec = GrammarSpec.from_params(req.params)
        assert spec is not None and self._backend is not None
        matcher, key = self._backend.matcher(spec, compiled)
        self._rows[req] = _Row(matcher, key)

    def release(self, req: Request) -> None:
        row = self._rows.pop(req, None)
        if row is not None and self._backend is not None:
            self._backend.release(row.key)

    def any(self, reqs: list[Request]) -> bool:
        """Whether any of these requests is constrained."""
        rows = self._rows
        return bool(rows) and any(r in rows for r in reqs)

    def take_rejected(self) -> list[Request]:
        """Requests whose matcher, catching up while masks were filled, rejected a token (to abort)."""
        if not self._rejected:
            return []
        out, self._rejected = self._rejected, []
        return out

    # ---- masks ----
    def masks(self, reqs: list[Request], device: torch.device, ticket: MaskTicket | None = None
              ) -> torch.Tensor | None:
        """The rows' packed bitmask on `device` (every token allowed in unconstrained or finished rows);
        None when no row is constrained. With a ticket the helpers' rows come from them and the engine
        fills the rest meanwhile; without (or if a helper failed) every row from current matchers."""
        backend = self._backend
        if ticket is not None:
            assert backend is not None
            # The engine fills only rows it owns, whose matchers are always current.
            rows = self._rows
            bitmask = backend.requested_masks([None if r.finished else _matcher(rows.get(r)) for r in reqs],
                                              ticket.keys, device)
            if bitmask is not None:
                return bitmask
        if not self._rows:
            return None
        assert backend is not None
        # A request that finished meanwhile keeps an unconstrained row; its token is dropped anyway.
        return backend.device_masks([None if r.finished else self._current(r) for r in reqs], device)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Mask the logits in place (for sampling paths that can't take the bitmask themselves)."""
        assert self._backend is not None
        self._backend.apply_bitmask(logits, bitmask)

    def ask_helpers(self, took: list[Request], tokens: list[int], rows: list[Request]) -> MaskTicket | None:
        """Start the helpers on `rows`' masks once their copies have taken `tokens` (sampled for `took`),
        before the loop's own host work on those tokens. None where no helper runs (or one failed): then
        they took nothing, and masks() fills every row here."""
        backend = self._backend
        if not self._rows or backend is None or not backend.helper_ready():
            return None
        keys = [None if r.finished else _key(self._rows.get(r)) for r in rows]
        if not backend.request_masks(keys, [None if r.finished else _key(self._rows.get(r)) for r in took], tokens):
            return None
        return MaskTicket(keys)

    def masks_when_answered(self, ticket: MaskTicket, reqs: list[Request], logits: torch.Tensor
                            ) -> torch.Tensor | None:
        """The rows' masks on the logits' device, copied there once every helper has answered (the device
        waits, so the sampling can be queued now). None where that can't be (the helpers don't fill every
        constrained row, the mask is narrower than the logits, the device can't wait so): nothing is queued.
        Follow a mask with settle()."""
        backend = self._backend
        assert backend is not None
        helpers = backend.helpers
        if helpers is None or helpers.bitmask.shape[1] * 32 < logits.shape[1]:
            return None
        return backend.masks_on_device_when_answered(
            ticket.keys, [None if r.finished else _matcher(self._rows.get(r)) for r in reqs], logits.device)

    def settle(self, ticket: MaskTicket, reqs: list[Request]) -> None:
        """After masks_when_answered: take the helpers' answers; if one failed, the engine fills their rows
        from its own matchers (caught up) before the device reads them, and stops using the helpers."""
        assert self._backend is not None
        self._backend.confirm_masks(ticket.keys, lambda: [self._current(r) for r in reqs])

    # ---- tokens ----
    def accept(self, reqs: list[Request], tokens: list[int], mirrored: bool = False) -> dict[Request, Ending]:
        """Feed each constrained row its sampled token; returns the requests the grammar ends (complete:
        "stop", or the token rejected: "abort"). mirrored: the helpers were sent these tokens already
        (ask_helpers), so the engine's matchers of the helpers' rows take them only when next read."""
        rows = self._rows
        if not rows:
            return {}
        backend = self._backend
        assert backend is not None
        stop_ids = backend.stop_ids
        ends: dict[Request, Ending] = {}
        for req, token in zip(reqs, tokens):
            row = rows.get(req)
            if row is None or req.finished:
                continue
            if mirrored and row.key is not None:
                # A helper's copy has taken the token and fills this row's masks, so the engine's matcher
                # can wait. A mask lets a stop token through only where the grammar can end.
                if token in stop_ids:
                    ends[req] = GRAMMAR_STOP
                else:
                    row.lag.append(token)
                continue
            if not mirrored:
                backend.accepted(row.key, token)
            if not self._catch_up(row):          # after the helpers stopped, it may still lag
                ends[req] = REJECTED
            elif not row.matcher.accept_token(token):
                ends[req] = REJECTED
            # The grammar is complete once it takes a stop token (asked only then: a call a row adds up).
            elif token in stop_ids and row.matcher.is_terminated():
                ends[req] = GRAMMAR_STOP
        return ends

    def _catch_up(self, row: _Row) -> bool:
        """Give the matcher the tokens its helper copy took; False if it rejects one (each was sampled
        under a mask from a matcher in the same state: the two disagreed)."""
        if row.lag:
            lag, row.lag = row.lag, []
            for token in lag:
                if not row.matcher.accept_token(token):
                    return False
        return True

    def _current(self, req: Request) -> Any:
        """req's matcher with every accepted token taken (None if unconstrained, finished or rejected)."""
        row = self._rows.get(req)
        if row is None or req.finished:
            return None
        if not self._catch_up(row):
            self.release(req)
            self._rejected.append(req)
            return None
        return row.matcher

    # ---- observability ----
    def helpers_ready(self) -> bool:
        """Whether helper processes run and have started (until then the engine fills every mask)."""
        return self._backend is not None and self._backend.helper_ready()

    def status(self) -> GrammarStatus:
        backend = self._backend
        helpers = backend.helpers if backend is not None else None
        return GrammarStatus(
            constrained=len(self._rows),
            helpers=helpers.count if helpers is not None else 0,
            helper_pids=helpers.pids() if helpers is not None else (),
            pinned=helpers is not None and helpers.pinned,
            helper_requests=helpers.requests if helpers is not None else 0,
            helper_busy_s=tuple((float(a), float(f)) for a, f in helpers.busy()) if helpers is not None else (),
            helpers_given_up=backend.given_up if backend is not None else 0,
            queued_on_device=backend.queued_on_device if backend is not None else 0,
            lagging=tuple(r.rid for r, row in self._rows.items() if row.lag))


def _matcher(row: _Row | None) -> Any:
    return None if row is None else row.matcher


def _key(row: _Row | None) -> int | None:
    return None if row is None else row.key
