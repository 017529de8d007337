"""Prompt sampler: batches of prompts over shuffled epochs, resumable exactly.

Epoch e visits every record once in the order `permutation(seed, e)`; a batch that reaches the
end of an epoch is completed from the start of the next (no prompt dropped, no short batch).
The whole state is (epoch, position in epoch, seed): saved in the checkpoint, it makes a resumed
run draw exactly the prompts an uninterrupted run would.
"""

import random
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_rl.data.records import PromptRecord


def permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Order of the n records in `epoch`: a seeded shuffle (the identity when not shuffling).

    A string seed makes `random.Random` hash it with SHA-512: stable across processes and
    Python versions, unlike `hash()`.
    """
    order = list(range(n))
    if shuffle:
        random.Random(f"prompts:{seed}:{epoch}").shuffle(order)
    return order


class PromptSampler:
    """Yields lists of `batch_size` records forever, epoch after epoch."""

    def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if not records:
            raise ValueError("PromptSampler: the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"PromptSampler: batch_size must be > 0, got {batch_size}")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # records of this epoch already drawn
        self._order = permutation(len(records), seed, 0, shuffle)

    def next_batch(self) -> list[PromptRecord]:
        """The next `batch_size` records (crossing into the next epoch when needed)."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self._start_epoch(self.epoch + 1)
            batch.append(self.records[self._order[self.position]])
            self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._order = permutation(len(self.records), self.seed, epoch, self.shuffle)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: where we are, and what to check on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_prompts": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuse one saved with other data, seed or shuffling."""
        for name, mine in (("seed", self.seed), ("shuffle", self.shuffle),
                           ("num_prompts", len(self.records))):
            if name in state and state[name] != mine:
                raise ValueError(f"prompt sampler state has {name}={state[name]!r} but this run "
                                 f"has {mine!r}: resuming would draw different prompts")
        position = int(state["position"])
        if not 0 <= position <= len(self.records):
            raise ValueError(f"prompt sampler state position {position} is outside the epoch "
                             f"of {len(self.records)} prompts")
        self._start_epoch(int(state["epoch"]))
        self.position = position
