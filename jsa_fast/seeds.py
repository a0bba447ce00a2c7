"""Seeds derived from a run's seed, the same in every process and run, one domain per use.

Every random stream of a run is seeded by `derived_seed(domain, seed, ...)`: the domain
keeps two uses from drawing the same numbers (without it, the masks of step 1 and the
augmentation of epoch 1's item 1 would share a seed), and the hash is of the integers
alone, so a stream is the same on any machine, process count and Python version.
"""

from __future__ import annotations

import enum
import hashlib

__all__ = ["SeedDomain", "derived_seed"]


class SeedDomain(enum.IntEnum):
    """What a derived seed is for, and the integers after the run's seed that it takes."""

    MODEL_INIT = 1  # (seed): the parameters' start, through the process RNG
    EPOCH_ORDER = 2  # (seed, epoch): the shuffled order of an epoch's items
    ITEM_AUGMENT = 3  # (seed, epoch, index): a training item's crop, flip, colour
    LOADER_WORKERS = 4  # (seed, epoch): the DataLoader's worker seeds
    TOKEN_MASKS = 5  # (seed, step): JSA's token masks of an optimiser step
    DALI_AUGMENT = 6  # (seed, shard): a DALI pipeline's augmentation, one per process
    VALIDATION_SPLIT = 7  # (seed): which training ids --val-fraction holds out
    VALIDATION_AUGMENT = 8  # (seed, epoch, index): a held-out item's transform
    SYNTHETIC_WORLD = 9  # (seed): the synthetic data set
    SYNTHETIC_CLIP = 10  # (seed): a synthetic moving clip


def derived_seed(domain: SeedDomain, *parts: int, bits: int = 63) -> int:
    """A seed that is a function of `domain` and the integers `parts` alone (the run's seed
    first, then what the domain names), `bits` wide: 63 for torch and NumPy, 31 where the
    consumer takes an int32 (DALI). BLAKE2b of the integers' decimal text, so the value
    does not depend on Python's hash or the platform."""
    if not isinstance(domain, SeedDomain):
        raise TypeError(f"domain must be a SeedDomain, got {domain!r}")
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits!r}")
    text = ",".join(str(int(part)) for part in (domain, *parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)
