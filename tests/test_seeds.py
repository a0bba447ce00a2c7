"""Seed domains: every random stream of a run has its own seed (jsa_fast/seeds.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from jsa_fast.config import PRESETS
from jsa_fast.data.datasets import epoch_order
from jsa_fast.seeds import SeedDomain, derived_seed
from jsa_fast.train import token_masks

SEEDS, EPOCHS, STEPS, INDICES, RANKS = range(3), range(6), range(120), range(64), range(4)

# What each domain's seed is a function of, over the ranges above (the run's seed first).
DOMAIN_PARTS = {
    SeedDomain.MODEL_INIT: (SEEDS,),
    SeedDomain.EPOCH_ORDER: (SEEDS, EPOCHS),
    SeedDomain.ITEM_AUGMENT: (SEEDS, EPOCHS, INDICES),
    SeedDomain.LOADER_WORKERS: (SEEDS, EPOCHS),
    SeedDomain.TOKEN_MASKS: (SEEDS, STEPS),
    SeedDomain.DALI_AUGMENT: (SEEDS, RANKS),
    SeedDomain.VALIDATION_SPLIT: (SEEDS,),
    SeedDomain.VALIDATION_AUGMENT: (SEEDS, EPOCHS, INDICES),
    SeedDomain.SYNTHETIC_WORLD: (SEEDS,),
    SeedDomain.SYNTHETIC_CLIP: (SEEDS,),
}


def test_every_domain_is_listed() -> None:
    assert set(DOMAIN_PARTS) == set(SeedDomain)


def test_no_two_streams_share_a_seed() -> None:
    """Over every (seed, epoch, step, index, rank) in the ranges, each use's seed is its own:
    no collision within a domain or across domains (the DALI seeds, 31 bits, compared by
    value with the others)."""
    owners: dict[int, tuple] = {}
    for domain, ranges in DOMAIN_PARTS.items():
        bits = 31 if domain is SeedDomain.DALI_AUGMENT else 63
        for parts in itertools.product(*ranges):
            value = derived_seed(domain, *parts, bits=bits)
            assert value not in owners, f"{(domain.name, *parts)} and {owners[value]} share seed {value}"
            owners[value] = (domain.name, *parts)
    assert len(owners) == sum(len(list(itertools.product(*r))) for r in DOMAIN_PARTS.values())


def test_the_domains_that_collided_before_now_differ() -> None:
    """Step s's token masks and epoch e's item 1 were both hash((seed, s or e, 1)): the same
    numbers whenever s == e."""
    assert derived_seed(SeedDomain.TOKEN_MASKS, 0, 3) != derived_seed(SeedDomain.ITEM_AUGMENT, 0, 3, 1)


def test_a_seed_does_not_depend_on_python_hashing() -> None:
    """The value is BLAKE2b of the integers' text: the same on every machine and Python. The
    literal pins that derivation, so that a change to it (which changes every run's streams)
    is seen here first."""
    assert derived_seed(SeedDomain.TOKEN_MASKS, 0, 0) == 0x1F6C470D53196218


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="domain must be a SeedDomain"):
        derived_seed(5, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits must be in"):
        derived_seed(SeedDomain.MODEL_INIT, 0, bits=64)


def test_token_masks_and_epoch_order_draw_from_their_domains() -> None:
    cfg = PRESETS["tiny"].model
    generator = torch.Generator().manual_seed(derived_seed(SeedDomain.TOKEN_MASKS, 7, 11))
    lv, la = cfg.image_grid[0] * cfg.image_grid[1], cfg.audio_tokens
    expected_img = torch.rand(4, lv, generator=generator) < cfg.mask_prob
    expected_aud = torch.rand(4, la, generator=generator) < cfg.mask_prob
    mask_img, mask_aud = token_masks(cfg, 4, 7, 11)
    assert torch.equal(mask_img, expected_img) and torch.equal(mask_aud, expected_aud)
    generator = torch.Generator().manual_seed(derived_seed(SeedDomain.EPOCH_ORDER, 7, 2))
    assert epoch_order(50, 7, 2) == torch.randperm(50, generator=generator).tolist()
