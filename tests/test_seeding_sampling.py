"""Seeds derived from the run seed, and seeded client sampling."""

from __future__ import annotations

from fedprompt.federation.sampling import sample_clients
from fedprompt.seeding import derive_seed


def test_derived_seeds_are_stable_distinct_and_in_range():
    a = derive_seed(0, "client-train", 3, 1)
    assert a == derive_seed(0, "client-train", 3, 1)
    others = {
        derive_seed(0, "client-train", 3, 2),
        derive_seed(0, "client-train", 4, 1),
        derive_seed(1, "client-train", 3, 1),
        derive_seed(0, "sampling", 3, 1),
    }
    assert a not in others and len(others) == 4
    assert all(0 <= s < 2**63 for s in [a, *others])


def test_sampling_fraction_minimum_and_order():
    ids = list(range(10))
    chosen = sample_clients(ids, 0.3, 2, run_seed=0, round_num=1)
    assert len(chosen) == 3 and chosen == sorted(chosen) and len(set(chosen)) == 3
    assert len(sample_clients(ids, 0.05, 2, 0, 1)) == 2  # the minimum wins
    assert sample_clients(ids, 1.0, 2, 0, 1) == ids
    assert sample_clients(ids, 0.5, 20, 0, 1) == ids  # capped at N


def test_sampling_is_seeded_by_run_and_round():
    ids = list(range(20))
    assert sample_clients(ids, 0.25, 1, 7, 3) == sample_clients(list(reversed(ids)), 0.25, 1, 7, 3)
    draws = {tuple(sample_clients(ids, 0.25, 1, 7, r)) for r in range(1, 8)}
    assert len(draws) > 1  # rounds differ
    assert sample_clients(ids, 0.25, 1, 7, 3) != sample_clients(ids, 0.25, 1, 8, 3)
