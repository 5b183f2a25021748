"""Sampling designs: reproducible draws, inclusion frequencies, DataLoader integration, errors."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from probopt.sampling.designs import (
    EpochBatchSampler,
    PoissonSampling,
    PPSWithReplacement,
    Sample,
    SimpleRandomSampling,
    StratifiedSampling,
    WithReplacementSample,
)
from probopt.sampling.gradient_estimator import UniformEstimator

N = 12
SIZES = torch.arange(1.0, N + 1)  # PPS sizes 1..12
STRATA = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])

DESIGNS = {
    "srs": lambda: SimpleRandomSampling(N, 5),
    "poisson": lambda: PoissonSampling(torch.linspace(0.1, 0.9, N)),
    "ppswr": lambda: PPSWithReplacement(SIZES, num_draws=4),
    "stratified": lambda: StratifiedSampling(STRATA, sample_sizes=[2, 1, 3]),
}


def _included(design, sample):
    """0/1 inclusion indicator of the distinct units of one sample."""
    hit = torch.zeros(design.population_size, dtype=torch.float64)
    hit[sample.indices] = 1.0
    return hit


@pytest.mark.parametrize("name", DESIGNS)
def test_draws_are_reproducible_from_a_seeded_generator(name):
    design = DESIGNS[name]()
    a = [design.sample(torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [design.sample(torch.Generator().manual_seed(7)) for _ in range(3)]
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    g = torch.Generator().manual_seed(7)
    seq = [design.sample(g).indices for _ in range(20)]
    assert any(not torch.equal(seq[0], s) for s in seq[1:])  # the generator advances


@pytest.mark.parametrize("name", DESIGNS)
def test_sample_fields(name):
    design = DESIGNS[name]()
    s = design.sample(torch.Generator().manual_seed(1))
    assert s.indices.dtype == torch.long
    pi = design.inclusion_probabilities()
    assert pi.dtype == torch.float64 and pi.shape == (N,)
    if isinstance(s, WithReplacementSample):
        assert s.indices.shape == (design.num_draws,)
        assert torch.equal(s.draw_probabilities, design.draw_probabilities[s.indices])
        assert torch.equal(s.units, torch.unique(s.indices))
        assert int(s.multiplicities.sum()) == design.num_draws
    else:
        assert isinstance(s, Sample)
        assert torch.equal(s.inclusion_probabilities, pi[s.indices])
        assert len(set(s.indices.tolist())) == s.indices.numel()  # without replacement
        if design.fixed_size:
            assert s.indices.numel() == design.sample_size


@pytest.mark.parametrize("name", DESIGNS)
def test_empirical_inclusion_frequencies_match_pi(name):
    """Monte Carlo: R = 4000 samples; every unit's frequency within 4.5 binomial SEs of pi_k.

    A 4.5-SE band fails with probability < 1e-5 per unit for a correct design (and the draws are
    seeded, so the test is deterministic); a wrong pi_k formula is off by far more.
    """
    design = DESIGNS[name]()
    g = torch.Generator().manual_seed(2024)
    reps = 4000
    freq = sum(_included(design, design.sample(g)) for _ in range(reps)) / reps
    pi = design.inclusion_probabilities()
    se = torch.sqrt(pi * (1 - pi) / reps).clamp_min(1e-3)
    assert torch.all((freq - pi).abs() <= 4.5 * se), (freq, pi)


def test_joint_submatrix_matches_full_matrix():
    for name, make in DESIGNS.items():
        design = make()
        full = design.joint_inclusion_probabilities()
        idx = torch.tensor([3, 0, 3, 11, 7])
        sub = design.joint_inclusion_probabilities(idx)
        assert torch.equal(sub, full[idx][:, idx]), name
        assert torch.allclose(full, full.T), name
        assert torch.equal(torch.diagonal(full), design.inclusion_probabilities()), name


def test_fixed_size_designs_have_joint_rows_summing_to_n_pi():
    """sum_l pi_kl = n pi_k for fixed-size designs (SSW 1992, result 2.6.2)."""
    for design in (DESIGNS["srs"](), DESIGNS["stratified"]()):
        pij = design.joint_inclusion_probabilities()
        pi = design.inclusion_probabilities()
        torch.testing.assert_close(pij.sum(1), design.sample_size * pi, rtol=0, atol=1e-12)


def test_full_joint_matrix_refused_for_a_large_population():
    design = SimpleRandomSampling(20000, 10)
    with pytest.raises(ValueError, match="20000 x 20000.*pass indices="):
        design.joint_inclusion_probabilities()
    assert design.joint_inclusion_probabilities(torch.tensor([1, 2])).shape == (2, 2)


def test_proportional_allocation():
    strata = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    design = StratifiedSampling(strata, sample_size=10)
    assert design.sample_sizes == [5, 3, 2]
    odd = StratifiedSampling(torch.tensor([0] * 5 + [1] * 4 + [2] * 3), sample_size=4)
    assert sum(odd.sample_sizes) == 4 and odd.sample_sizes == [2, 1, 1]  # largest remainder


@pytest.mark.parametrize("name", DESIGNS)
def test_batch_sampler_drives_a_dataloader(name):
    design = DESIGNS[name]()
    data = TensorDataset(torch.arange(N))
    loader = DataLoader(
        data, batch_sampler=design.batch_sampler(5, torch.Generator().manual_seed(3))
    )
    batches = [b[0].tolist() for b in loader]
    g = torch.Generator().manual_seed(3)
    expected = [design.sample(g).indices.tolist() for _ in range(5)]
    assert len(loader) == 5
    # (P(empty sample) = prod(1 - pi_k) is ~4e-4 for the Poisson design here; none is drawn)
    assert batches == expected


def test_batch_sampler_without_generator_follows_torch_manual_seed():
    sampler = SimpleRandomSampling(N, 4).batch_sampler(3)
    torch.manual_seed(11)
    first = list(sampler)
    torch.manual_seed(11)
    assert list(sampler) == first


def test_epoch_sampler_is_the_shuffled_minibatch_of_the_training_loop():
    design = SimpleRandomSampling(10, 3)
    est = UniformEstimator()
    est.setup(None, torch.zeros(10, 1), torch.zeros(10))
    ours = list(design.epoch_sampler(torch.Generator().manual_seed(5)))
    loop = [b.tolist() for b in est.epoch_batches(3, torch.Generator().manual_seed(5))]
    assert ours == loop and len(ours) == 3
    last = list(design.epoch_sampler(torch.Generator().manual_seed(5), drop_last=False))
    assert len(last) == 4 and sorted(sum(last, [])) == list(range(10))
    data = TensorDataset(torch.arange(10))
    loader = DataLoader(data, batch_sampler=design.epoch_sampler(torch.Generator().manual_seed(5)))
    assert [b[0].tolist() for b in loader] == ours


def test_ppswr_inclusion_probabilities_closed_form():
    design = PPSWithReplacement([1.0, 3.0], num_draws=2)
    # P(unit 0 drawn at least once in 2 draws) = 1 - 0.75^2; both drawn = 2 * 0.25 * 0.75
    torch.testing.assert_close(
        design.inclusion_probabilities(),
        torch.tensor([1 - 0.75**2, 1 - 0.25**2], dtype=torch.float64),
    )
    assert math.isclose(float(design.joint_inclusion_probabilities()[0, 1]), 0.375)


# --------------------------------------------------------------------------------------------
# bad input: one ValueError per problem, naming it and the value

ERRORS = [
    (lambda: SimpleRandomSampling(10, 11), r"sample_size: 11 is larger than the population \(10"),
    (lambda: SimpleRandomSampling(10, 0), r"Invalid sample_size: 0"),
    (lambda: SimpleRandomSampling(0, 1), r"Invalid population_size: 0"),
    (lambda: SimpleRandomSampling(10.0, 2), r"Invalid population_size: 10.0"),
    (
        lambda: PoissonSampling([0.5, 0.0, 0.2]),
        r"unit 1 has value 0.0; every unit must be drawable",
    ),
    (lambda: PoissonSampling([0.5, -0.1]), r"unit 1 has value -0.1"),
    (lambda: PoissonSampling([0.5, float("nan")]), r"unit 1 has non-finite value nan"),
    (lambda: PoissonSampling([0.5, 1.5]), r"unit 1 has probability 1.5 > 1"),
    (
        lambda: PoissonSampling([0.5, 0.5], population_size=3),
        r"length 2 does not match population_size 3",
    ),
    (lambda: PoissonSampling([]), r"non-empty 1-D vector"),
    (lambda: PPSWithReplacement([1.0, 0.0], 2), r"Invalid sizes: unit 1 has value 0.0"),
    (lambda: PPSWithReplacement([1.0, float("inf")], 2), r"unit 1 has non-finite value inf"),
    (
        lambda: PPSWithReplacement([1.0, 2.0], 2, population_size=4),
        r"Invalid sizes: length 2 does not match population_size 4",
    ),
    (lambda: PPSWithReplacement([1.0, 2.0], 0), r"Invalid num_draws: 0"),
    (lambda: StratifiedSampling([0, 0, 2, 2], sample_size=2), r"stratum 1 is empty"),
    (lambda: StratifiedSampling([0, 0, 1], sample_sizes=[1, 1, 1]), r"stratum 2 is empty"),
    (
        lambda: StratifiedSampling([0, 0, 1], sample_sizes=[3, 1]),
        r"sample size of stratum 0: 3 is larger than the stratum \(2 units\)",
    ),
    (lambda: StratifiedSampling([0, 0, 1], sample_sizes=[1, 0]), r"sample size of stratum 1: 0"),
    (lambda: StratifiedSampling([0, 0, 1], sample_sizes=[1]), r"label 1 has no entry"),
    (
        lambda: StratifiedSampling([0, 0, 1], sample_size=4),
        r"sample_size: 4 is larger than the population \(3 units\)",
    ),
    (
        lambda: StratifiedSampling([0] * 9 + [1], sample_size=2),
        r"gives stratum 1 \(1 of 10 units\) no draw",
    ),
    (lambda: StratifiedSampling([0, 1], sample_size=1, sample_sizes=[1, 0]), r"exactly one of"),
    (lambda: StratifiedSampling([0.0, 1.0], sample_size=1), r"labels must be integers"),
    (lambda: StratifiedSampling([0, -1], sample_size=1), r"labels must be >= 0, got -1"),
    (lambda: SimpleRandomSampling(5, 2).batch_sampler(0), r"Invalid num_batches: 0"),
    (
        lambda: SimpleRandomSampling(5, 2).joint_inclusion_probabilities(torch.tensor([0, 5])),
        r"values must lie in \[0, 4\], got range \[0, 5\]",
    ),
    (lambda: EpochBatchSampler(5, 6), r"batch_size: 6 is larger than the population \(5"),
]


@pytest.mark.parametrize("make, message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_input_raises_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
