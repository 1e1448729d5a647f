"""Length-grouped batches: rows of similar length share a batch, so little of it is padding.

A shuffled batch of 8 real BoolQ/MedQA rows is about a third padding (each row is padded to the
batch's longest); grouping by length brings that to a few percent (``bench/padding.py`` prints
both). :class:`LengthGroupedBatchSampler` does it without giving up randomness:

1. permute all indices with a generator seeded by ``(seed, epoch)``;
2. cut the permutation into mega-chunks of ``group_factor * batch_size`` rows;
3. sort each chunk by length (longest first; ties keep the permuted order) and cut it into batches;
4. shuffle the order of all batches with the same generator.

Every row appears exactly once an epoch, and the same ``(seed, epoch)`` always gives the same
batches, so a run resumed mid-epoch that skips the batches it has already trained on sees exactly
the rest of the uninterrupted run's epoch. A larger ``group_factor`` packs tighter (rows are
matched from a bigger pool) but makes batch composition less random; with the default 64 and batch
8 a chunk holds 512 rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["LengthGroupedBatchSampler", "padding_share", "DEFAULT_GROUP_FACTOR"]

DEFAULT_GROUP_FACTOR = 64


def padding_share(batches: Iterable[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest row.

    ``batches`` hold row indices into ``lengths`` (tokens per row). The share is
    ``sum over batches (len(batch) * longest - sum of its lengths) / sum over batches
    (len(batch) * longest)``; 0.0 when there are no positions at all.

    Example: lengths ``[2, 4, 3, 3]`` in batches ``[[0, 1], [2, 3]]`` are padded to 2 x 4 and
    2 x 3 = 14 positions of which 2 are padding (row 0 gets 2): ``2 / 14 = 0.142857...``.
    """
    padded = total = 0
    for batch in batches:
        if not len(batch):
            continue
        row_lengths = [int(lengths[i]) for i in batch]
        size = len(row_lengths) * max(row_lengths)
        total += size
        padded += size - sum(row_lengths)
    return padded / total if total else 0.0


def _check_int(name: str, value, minimum: int) -> str | None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        return f"{name} must be an integer >= {minimum}, got {value!r}"
    return None


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices whose rows have similar lengths, in an order shuffled by (seed, epoch).

    Use as ``DataLoader(dataset, batch_sampler=LengthGroupedBatchSampler(lengths, 8, seed=s,
    epoch=e), collate_fn=...)``. See the module docstring for the algorithm.

    Args:
        lengths: tokens per row (``len(lengths)`` rows); only their order matters.
        batch_size: rows per batch; the one batch that may be shorter comes from the last chunk.
        seed, epoch: the generator's seed; each pair gives its own batches. ``set_epoch`` changes
            the epoch for the next iteration.
        drop_last: leave out the shorter batch (``len(lengths) % batch_size`` rows, which then do
            not appear that epoch).
        group_factor: batches per sorted chunk; 1 sorts within each random batch only (no gain),
            ``>= len(lengths) / batch_size`` sorts the whole epoch at once.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False, group_factor: int = DEFAULT_GROUP_FACTOR):
        problems = [p for p in (_check_int("batch_size", batch_size, 1), _check_int("epoch", epoch, 0),
                                _check_int("group_factor", group_factor, 1), _check_int("seed", seed, -2**63))
                    if p]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            problems.append(f"lengths must be a flat sequence of ints, got shape {self.lengths.shape}")
        elif (self.lengths < 0).any():
            problems.append(f"lengths must be >= 0, got {int(self.lengths.min())} at index {int(self.lengths.argmin())}")
        if problems:
            raise ValueError("LengthGroupedBatchSampler: " + "; ".join(problems))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.drop_last = bool(drop_last)
        self.group_factor = int(group_factor)

    def set_epoch(self, epoch: int) -> None:
        problem = _check_int("epoch", epoch, 0)
        if problem:
            raise ValueError(problem)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order (what iterating yields)."""
        # SeedSequence mixes (seed, epoch) as a pair: seed 1 epoch 0 and seed 0 epoch 1 differ.
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.group_factor * self.batch_size
        batches = []
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            # Longest first; the stable sort keeps the random order among rows of equal length.
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            batches.extend(rows[i:i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size))
        # Only the last chunk can end in a short batch (chunks are whole multiples of batch_size).
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())
