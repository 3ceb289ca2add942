"""xgrammar underneath the constraints: compile once per distinct constraint, one matcher per sample,
packed vocabulary bitmasks filled on the host (here or by the mask helpers) and copied to the device."""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlserve.engine.grammar.helpers import MaskHelpers
from rlserve.engine.grammar.spec import GrammarSpec

log = logging.getLogger("rlserve")
# xgrammar's thread pool costs ~0.2 ms a fill to dispatch (H100 host: 64 cheap rows take 0.27 ms on one
# thread, 0.41 ms on eight); a fill whose rows would take longer than this on one thread is spread. In
# the engine the pool loses by more than that: with fills of ~0.4 ms (64 rows of a plain JSON schema)
# the structured benchmark ran 31-33% over unconstrained with the pool, 8-20% on one thread.
PARALLEL_FILL_S = 1e-3
SERIAL_PROBE_EVERY = 16     # fills between serial ones that re-measure the cost per row


class GrammarBackend:
    """Owns the xgrammar compiler for one tokenizer; compiled grammars are cached by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_cache: int = 256,
                 helpers: int = 0, helper_rows: int = 0, pin: bool = False) -> None:
        """helpers > 0: that many helper processes (grammar.worker) fill masks of batches of up to
        helper_rows rows beside the engine."""
        import xgrammar as xgr  # imported on first use: the engine core doesn't need it otherwise

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_token_ids)    # a matcher can only terminate on one of these
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=4)
        self.cache: dict[GrammarSpec, Any] = {}
        self.max_cache = max_cache
        # Filling masks is the host's per-step cost of constrained decoding: ~4 us a row for a plain JSON
        # schema, ~100 us for length-bounded strings. Cheap fills run on one thread; costly ones are
        # spread over xgrammar's pool, picked by the cost per row of the last one-thread fill.
        self._serial_filler = xgr.BatchGrammarMatcher(max_threads=1)
        self._parallel_filler = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) - 1)))
        self._serial_row_s = 0.0
        self._fills = 0
        self._bitmask: torch.Tensor | None = None     # reused host buffer, pinned when copied to a GPU
        self._matchers = itertools.count()
        self._helper_keys = itertools.count()
        self.helpers: MaskHelpers | None = None
        self.given_up = 0            # times the helpers failed, exited or were stuck and were dropped
        self.queued_on_device = 0    # samplings queued behind a device-side wait for the helpers' answers
        # The share of matchers whose rows the helpers fill (for matchers made after it is set). One
        # helper takes half and the engine fills the rest meanwhile; two or more take them all, since
        # the engine's own fills were then the longest path of a structured-output step (measured on an H100).
        self.helper_share = 0.5 if helpers == 1 else 1.0
        if helpers > 0 and helper_rows > 0:
            words = xgr.allocate_token_bitmask(1, vocab_size).shape[1]
            self.helpers = MaskHelpers(helpers, info.serialize_json(), stop_token_ids, helper_rows, words, pin)

    def compile(self, spec: GrammarSpec) -> Any:
        """Compile (or fetch) a grammar; a bad constraint raises ValueError with the compiler's words."""
        if spec in self.cache:
            return self.cache[spec]
        try:
            if spec.kind == "json_schema":
                compiled = self.compiler.compile_json_schema(spec.source, any_whitespace=False)
            elif spec.kind == "json_object":
                # OpenAI's json_object mode promises an object, not any JSON value.
                compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.kind == "regex":
                compiled = self.compiler.compile_regex(spec.source)
            else:
                compiled = self.compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid {spec.kind} constraint: {_first_line(e)}") from None
        if len(self.cache) >= self.max_cache:
            self.cache.pop(next(iter(self.cache)))
        self.cache[spec] = compiled
        return compiled

    def matcher(self, spec: GrammarSpec, compiled: Any) -> tuple[Any, int | None]:
        """A new matcher and, when a mask helper fills its rows, the key that names it to the helper
        (release it when done); None when the engine fills them."""
        n = next(self._matchers)
        key = None
        if self.helpers is not None and self._share_to_helpers(n):
            key = next(self._helper_keys)
            self.helpers.add(key, spec, compiled)
        return self.xgr.GrammarMatcher(compiled), key

    def _share_to_helpers(self, n: int) -> bool:
        # The n-th matcher goes to a helper when it takes the count of helper-owned ones up a step.
        f = self.helper_share
        return int((n + 1) * f) > int(n * f)

    def release(self, key: int | None) -> None:
        if key is not None and self.helpers is not None:
            self.helpers.drop(key)

    def accepted(self, key: int | None, token: int) -> None:
        """A matcher accepted a token: the helper's copy takes it with its next request."""
        if key is not None and self.helpers is not None:
            self.helpers.accepted(key, token)

    def helper_ready(self) -> bool:
        """Whether mask helpers run and have started (until then the engine fills every mask)."""
        if self.helpers is None:
            return False
        try:
            return self.helpers.ready()
        except (OSError, EOFError, RuntimeError) as e:
            self._lose_helpers(e)
            return False

    def request_masks(self, keys: list[int | None], took: Sequence[int | None] = (),
                      tokens: Sequence[int] = ()) -> bool:
        """Start the helpers on their rows of a batch's masks (keys: the rows' helper keys, None
        where the engine fills or the row is unconstrained), once their matchers have taken `tokens`
        (took: each token's helper key, or None). False when there are no helpers, and then they
        took nothing (fill everything with device_masks)."""
        helpers = self.helpers
        if helpers is None or not self.helper_ready():
            return False
        try:
            helpers.request(keys, list(took), list(tokens))
            return True
        except (OSError, EOFError, ValueError, RuntimeError) as e:
            self._lose_helpers(e)
            return False

    def requested_masks(self, matchers: list[Any | None], owned: list[int | None],
                        device: torch.device) -> torch.Tensor | None:
        """The batch's masks on `device`: the helpers' rows (`owned`, as given to request_masks) and
        the engine's own (`matchers`, read only where owned is None), filled here meanwhile into the
        same shared buffer. None if a helper failed: fill them all with device_masks."""
        helpers = self.helpers
        if helpers is None:
            return None
        bitmask = helpers.bitmask[:len(owned)]
        self._fill_rows(bitmask, matchers, [i for i, k in enumerate(owned) if k is None])
        try:
            helpers.result()
        except (OSError, EOFError, RuntimeError) as e:
            self._lose_helpers(e)
            return None
        if device.type == "cuda" and not helpers.pinned:
            bitmask = self._host_bitmask(bitmask.shape[0], device).copy_(bitmask)
        return bitmask.to(device, non_blocking=True)

    def masks_on_device_when_answered(self, owned: list[int | None], matchers: list[Any | None],
                                      device: torch.device) -> torch.Tensor | None:
        """The batch's masks on `device`, copied once every helper has answered the request just made:
        the copy waits on the device, so the host can queue the sampling now and go on. Only where the
        device can wait so and the helpers fill every constrained row (`owned`, `matchers` as for
        requested_masks); None otherwise, with nothing queued. Follow with confirm_masks."""
        helpers = self.helpers
        if helpers is None or device.type != "cuda" or not helpers.waits_on_device():
            return None
        if any(k is None and m is not None for k, m in zip(owned, matchers)):
            return None
        bitmask = helpers.bitmask[:len(owned)]
        self._fill_rows(bitmask, matchers, [i for i, k in enumerate(owned) if k is None])   # all unconstrained
        if not helpers.wait_on_device(torch.cuda.current_stream(device)):
            # Some waits may be queued: they pass once the helpers answer, which they do regardless.
            return None
        self.queued_on_device += 1
        return bitmask.to(device, non_blocking=True)

    def confirm_masks(self, owned: list[int | None], matchers_now: Callable[[], list[Any | None]]) -> None:
        """After masks_on_device_when_answered: take the helpers' answers. If one failed, exited or is
        stuck, the engine fills the helpers' rows itself (matchers_now() gives every row's current
        matcher), lets the device's copy go, waits for it, and stops using the helpers."""
        helpers = self.helpers
        assert helpers is not None
        try:
            helpers.result()
            return
        except (OSError, EOFError, RuntimeError) as e:
            error = e
        self._fill_rows(helpers.bitmask[:len(owned)], matchers_now(),
                        [i for i, k in enumerate(owned) if k is not None])
        helpers.release_device()
        torch.cuda.synchronize()
        self._lose_helpers(error)

    def _lose_helpers(self, error: Exception) -> None:
        log.warning("grammar mask helper stopped (%s); masks are filled in the engine process", error)
        helpers, self.helpers = self.helpers, None
        self.given_up += 1
        if helpers is not None:
            helpers.abandon()

    def apply_masks(self, logits: torch.Tensor, matchers: list[Any | None]) -> None:
        """Mask, in place, every row whose request is constrained."""
        device_mask = self.device_masks(matchers, logits.device)
        if device_mask is not None:
            self.apply_bitmask(logits, device_mask)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)

    def device_masks(self, matchers: list[Any | None], device: torch.device) -> torch.Tensor | None:
        """The batch's packed bitmask ([rows, words] int32) on `device`, every bit set in rows without
        a matcher; None when no row is constrained. Called while the device may still be running the
        forward pass whose logits it masks, so filling it on the host overlaps with that; the copy is
        asynchronous from pinned memory."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = self._host_bitmask(len(matchers), device)
        self._fill([matchers[i] for i in rows], bitmask, rows)
        if len(rows) < len(matchers):
            # Unconstrained rows allow everything, so the mask applies to the whole batch: passing row
            # indices instead would cost a copy of them from pageable memory every step.
            free = torch.ones(len(matchers), dtype=torch.bool)
            free[rows] = False
            bitmask[free] = -1
        # The buffer is refilled next step only after this step's sampled tokens were read back,
        # which the device does after this copy: no copy can still be reading it then.
        return bitmask.to(device, non_blocking=True)

    def _fill_rows(self, bitmask: torch.Tensor, matchers: list[Any | None], rows: list[int]) -> None:
        """Fill bitmask's `rows` from their matchers; a row without one (unconstrained, or its request
        finished) allows every token."""
        constrained = [i for i in rows if matchers[i] is not None]
        if constrained:
            self._fill([matchers[i] for i in constrained], bitmask, constrained)
        free = [i for i in rows if matchers[i] is None]
        if free:
            bitmask[free] = -1

    def _fill(self, matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        self._fills += 1
        probe = self._fills % SERIAL_PROBE_EVERY == 1
        if not probe and self._serial_row_s * len(rows) > PARALLEL_FILL_S:
            self._parallel_filler.batch_fill_next_token_bitmask(matchers, bitmask, rows)
            return
        start = time.perf_counter()
        self._serial_filler.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        self._serial_row_s = (time.perf_counter() - start) / len(rows)

    def _host_bitmask(self, rows: int, device: torch.device) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            shape = self.xgr.allocate_token_bitmask(max(rows, 64), self.vocab_size).shape
            self._bitmask = torch.empty(shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        return self._bitmask[:rows]


def _first_line(e: Exception) -> str:
    msg = str(e).strip()
    # xgrammar prefixes messages with "[time] file.cc:line: "; keep the human part.
    if "] " in msg and ".cc:" in msg:
        msg = msg.split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(e).__name__
