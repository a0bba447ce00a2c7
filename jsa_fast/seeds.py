"""Seeds derived from a run's seed, the same in every process and run."""

from __future__ import annotations

__all__ = ["derived_seed"]


def derived_seed(*parts: int, bits: int = 63) -> int:
    """A seed that is a function of the integers `parts` alone (e.g. run seed, epoch, item),
    `bits` wide: 63 for torch.manual_seed, 31 where the consumer takes an int32 (DALI) or
    where an existing order must stay as it was (`epoch_order`). Python hashes a tuple of
    ints the same in every process and run (PYTHONHASHSEED salts only str and bytes)."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits!r}")
    return hash(parts) & ((1 << bits) - 1)
