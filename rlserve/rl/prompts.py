"""Where a run's prompts come from, resumable from one integer: how many samples it has handed out.

A synthetic task is an endless generator that is deterministic given its seed, so resuming re-creates
it and skips what was consumed. A dataset (a list) is walked in a shuffled order that is fresh each
epoch and seeded by (seed, epoch), so the position alone says where the walk is.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Sample = dict[str, Any]


class PromptStream:
    def __init__(self, generator: Callable[[], Iterator[Sample]] | None = None,
                 items: Sequence[Sample] | None = None, seed: int = 0) -> None:
        if (generator is None) == (items is None):
            raise ValueError("give a generator factory or a list of samples, not both")
        if items is not None and not items:
            raise ValueError("the dataset is empty")
        self._factory = generator
        self._items = items
        self._seed = seed
        self.consumed = 0
        self._epoch_order: tuple[int, list[int]] | None = None   # (epoch, shuffled indices)
        self._iter: Iterator[Sample] | None = generator() if generator is not None else None

    def take(self, n: int) -> list[Sample]:
        if self._iter is not None:
            out = list(itertools.islice(self._iter, n))
            if len(out) < n:
                raise ValueError(f"the prompt generator ran dry after {self.consumed + len(out)} samples")
        else:
            out = [self._item_at(self.consumed + i) for i in range(n)]
        self.consumed += n
        return out

    def seek(self, consumed: int) -> None:
        """Continue as if `consumed` samples had already been taken from a fresh stream."""
        if self._factory is not None:
            self._iter = self._factory()
            for _ in itertools.islice(self._iter, consumed):
                pass
        self.consumed = consumed

    def _item_at(self, position: int) -> Sample:
        assert self._items is not None
        epoch, index = divmod(position, len(self._items))
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self._items)))
            random.Random(f"{self._seed}:{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._items[self._epoch_order[1][index]]
