"""Length-bucketed batches of example indices, in an order fixed by a seed and the epoch, sharded for data
parallel (every rank computes the same global batches and keeps its part)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..errors import entry_point

__all__ = ["bucketed_batches"]

_CHUNK_BATCHES = 50          # bucketed_batches sorts by length within chunks of this many batches


@entry_point(name="looplift.train.bucketed_batches")
def bucketed_batches(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                     world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Batches of example indices with similar lengths, in an order fixed by `seed` and `epoch`.

    With `shuffle`, the indices are shuffled, sorted by length within chunks
    of ``50 * batch_size``, cut into batches of `batch_size` (the last one may
    be smaller) and the batches shuffled. Without it, the indices are sorted
    by length (stable) and cut in order: for evaluation. The random order
    comes from a private generator seeded from ``(seed, epoch)``; the global
    RNGs are neither used nor changed.

    With ``world_size > 1``, every rank computes the same global batches and
    keeps its part of each: rank ``r`` the contiguous slice
    ``batch[len(batch) * r // world_size : len(batch) * (r + 1) // world_size]``,
    so the parts differ in size by at most one. A global batch with fewer
    examples than ranks (only the last one can be) is dropped, so every rank
    takes the same number of steps and none gets an empty part; at most
    ``world_size - 1`` examples, different ones each epoch, are left out.

    Raises:
        ValueError: `batch_size` is below 1 or below `world_size`, or `rank`
            is not in ``range(world_size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in range(world_size), got rank={rank}, world_size={world_size}")
    if batch_size < world_size:
        raise ValueError(f"batch_size {batch_size} is smaller than world_size {world_size}: each global batch "
                         f"is split among the ranks, so it needs at least one example per rank")
    lengths = [int(n) for n in lengths]
    order = list(range(len(lengths)))
    if shuffle:
        rng = random.Random(f"bucketed_batches/{seed}/{epoch}")
        rng.shuffle(order)
        chunk = _CHUNK_BATCHES * batch_size
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lengths.__getitem__)]
    else:
        order.sort(key=lengths.__getitem__)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    if world_size == 1:
        return batches
    return [b[len(b) * rank // world_size:len(b) * (rank + 1) // world_size] for b in batches if len(b) >= world_size]
