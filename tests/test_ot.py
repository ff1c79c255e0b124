"""Expected-OT targets (core/ot.py): hand values, properties (hypothesis), agreement of the three paths."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from fairdiff_ray.core.ot import (
    _count_vectors,
    assign_targets,
    expected_targets,
    expected_targets_separated,
)
from fairdiff_ray.core.targets import TargetDistribution

FEW = settings(max_examples=25, deadline=None)
RACE = ["white", "black", "indian", "asian"]


def binary(rho: float = 0.5, name: str = "gender", classes=("female", "male")) -> TargetDistribution:
    return TargetDistribution.from_spec({name: {"classes": list(classes), "probs": [rho, 1 - rho]}})


def single(probs: list[float], name: str = "race") -> TargetDistribution:
    return TargetDistribution.from_spec(
        {name: {"classes": [f"c{k}" for k in range(len(probs))], "probs": probs}}
    )


def gender_race() -> TargetDistribution:
    return TargetDistribution.from_spec(
        {
            "gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]},
            "race": {"classes": RACE, "probs": [0.25] * 4},
        }
    )


def random_probs(seed: int, n: int, k: int, sharpness: float = 2.0) -> torch.Tensor:
    """(n, k) distinct softmax rows (continuous draws: no ties)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * sharpness, dim=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_closed_form_hand_values():
    # p(male) ascending: image 1 (rank 0), image 2 (rank 1), image 0 (rank 2); q(female) = P(Bin(3, .5) > r)
    p = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]])
    q = expected_targets({"gender": p}, binary(0.5), method="closed_form")["gender"]
    assert torch.allclose(q[:, 0], torch.tensor([1 / 8, 7 / 8, 1 / 2]))
    assert torch.allclose(q.sum(1), torch.ones(3))
    assert q.dtype == p.dtype


def test_closed_form_matches_binomial_tail_for_non_uniform_target():
    p = random_probs(0, 12, 2)
    rho = 0.25
    q = expected_targets({"age": p}, binary(rho, "age", ("young", "old")))["age"]
    ranks = torch.argsort(torch.argsort(p[:, 1]))
    assert torch.allclose(q[:, 0], torch.as_tensor(binom.sf(ranks.numpy(), 12, rho)))


@FEW
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 24),
    method=st.sampled_from(["closed_form", "exact", "monte_carlo"]),
)
def test_permutation_equivariance(seed, n, method):
    if method == "closed_form":
        target, probs = binary(0.4), {"gender": random_probs(seed, n, 2)}
    elif method == "exact":
        target, probs = single([0.5, 0.3, 0.2]), {"race": random_probs(seed, n, 3)}
    else:
        target = gender_race()
        probs = {"gender": random_probs(seed, n, 2), "race": random_probs(seed + 1, n, 4)}
    perm = torch.randperm(n, generator=gen(seed))
    q = expected_targets(probs, target, method=method, generator=gen(7))
    q_perm = expected_targets({a: p[perm] for a, p in probs.items()}, target, method=method, generator=gen(7))
    for a in q:
        assert torch.allclose(q_perm[a], q[a][perm], atol=1e-9)


@FEW
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 12),
    method=st.sampled_from(["closed_form", "exact", "monte_carlo"]),
)
def test_identical_predictions_get_identical_targets(seed, n, method):
    # saturated classifiers give exactly tied rows; a tie must not favour the lower index
    target = (
        binary(0.5) if method == "closed_form" else single([0.5, 0.5]) if method == "exact" else gender_race()
    )
    names = target.names
    base = {a: random_probs(seed + i, n, target.num_classes[a]) for i, a in enumerate(names)}
    probs = {a: torch.cat([p, p[:1].repeat(3, 1)]) for a, p in base.items()}
    q = expected_targets(probs, target, method=method, generator=gen(seed))
    for a in names:
        assert torch.allclose(q[a][n:], q[a][0].expand(3, -1), atol=1e-12)
        assert torch.allclose(q[a][0], q[a][n], atol=1e-12)


@FEW
@given(seed=st.integers(0, 10_000), n=st.integers(2, 10), rho=st.floats(0.1, 0.9))
def test_binary_paths_agree(seed, n, rho):
    p = {"gender": random_probs(seed, n, 2)}
    target = binary(rho)
    closed = expected_targets(p, target, method="closed_form")["gender"]
    exact = expected_targets(p, target, method="exact", coverage=0.9999)["gender"]
    mc = expected_targets(p, target, method="monte_carlo", num_draws=6000, generator=gen(seed))["gender"]
    assert (closed - exact).abs().max() < 0.03
    assert (closed - mc).abs().max() < 0.03


@FEW
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), k=st.integers(3, 4))
def test_exact_and_monte_carlo_agree_for_one_attribute(seed, n, k):
    pi = np.random.default_rng(seed).dirichlet(np.ones(k) * 3)
    target = single((pi / pi.sum()).tolist())
    p = {"race": random_probs(seed, n, k)}
    exact = expected_targets(p, target, method="exact", coverage=0.9999)["race"]
    mc = expected_targets(p, target, method="monte_carlo", num_draws=6000, generator=gen(seed))["race"]
    assert (exact - mc).abs().max() < 0.03


def test_auto_picks_the_right_path_for_one_attribute():
    p = {"race": random_probs(3, 20, 4)}
    target = single([0.25] * 4)
    auto = expected_targets(p, target)["race"]
    exact = expected_targets(p, target, method="exact")["race"]
    assert torch.equal(auto, exact)
    pb = {"gender": random_probs(3, 20, 2)}
    assert torch.equal(
        expected_targets(pb, binary())["gender"],
        expected_targets(pb, binary(), method="closed_form")["gender"],
    )
    # too many count vectors for the exact path: auto falls back to Monte-Carlo (same draws, same q)
    many = {"race": random_probs(3, 64, 6)}
    target6 = single([1 / 6] * 6)
    auto6 = expected_targets(many, target6, generator=gen(2))["race"]
    assert torch.equal(auto6, expected_targets(many, target6, method="monte_carlo", generator=gen(2))["race"])


def test_count_vectors_descend_and_cover():
    pi = np.array([0.5, 0.3, 0.2])
    counts, w = _count_vectors(6, pi, 1.0, 10_000)
    assert len(counts) == math.comb(6 + 2, 2)  # coverage 1 enumerates every vector
    assert (counts.sum(1) == 6).all()
    # probabilities (before renormalisation, which is a no-op here) are non-increasing and sum to 1
    assert np.all(np.diff(w) <= 1e-15) and abs(w.sum() - 1) < 1e-12
    counts95, w95 = _count_vectors(30, pi, 0.95, 10_000)
    assert len(counts95) < math.comb(32, 2)
    assert _count_vectors(30, pi, 0.95, 5) is None


def _within_spread(assigned: torch.Tensor, share: float, n: int) -> bool:
    return int(assigned.sum()) <= n * share + 2 * math.sqrt(n * share * (1 - share)) + 1


@FEW
@given(seed=st.integers(0, 10_000), n=st.integers(8, 40), kind=st.sampled_from(["binary", "race", "joint"]))
def test_confident_targets_never_exceed_the_share(seed, n, kind):
    # well-separated predictions, 80% of them of class 0: confident targets must still respect the target
    rng = np.random.default_rng(seed)

    def separated(k: int) -> torch.Tensor:
        cls = np.where(rng.random(n) < 0.8, 0, rng.integers(1, k, n))
        p = np.full((n, k), 0.02 / (k - 1)) + rng.random((n, k)) * 1e-3  # jitter: no exact ties
        p[np.arange(n), cls] += 0.98
        return torch.as_tensor(p / p.sum(1, keepdims=True))

    target = binary(0.5) if kind == "binary" else single([0.25] * 4) if kind == "race" else gender_race()
    probs = {a: separated(k) for a, k in target.num_classes.items()}
    y = assign_targets(expected_targets(probs, target, generator=gen(seed)))
    for a, k in target.num_classes.items():
        share = target.marginal(a)
        for c in range(k):
            assert _within_spread(y[a] == c, float(share[c]), n), (a, c, y[a])


@FEW
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40))
def test_non_uniform_target_shifts_the_shares(seed, n):
    p = {"age": random_probs(seed, n, 2, sharpness=1.0)}
    q = {rho: expected_targets(p, binary(rho, "age", ("young", "old")))["age"] for rho in (0.5, 0.75, 0.9)}
    for rho, qa in q.items():
        # E[number of 'young' targets] = n * rho exactly (the closed form sums the whole binomial)
        assert abs(float(qa[:, 0].sum()) - n * rho) < 1e-9
    assert (q[0.75][:, 0] >= q[0.5][:, 0] - 1e-12).all() and (q[0.9][:, 0] >= q[0.75][:, 0] - 1e-12).all()
    young = {rho: int((assign_targets({"age": qa}, 0.5)["age"] == 0).sum()) for rho, qa in q.items()}
    assert young[0.5] <= young[0.75] <= young[0.9]


def test_non_uniform_joint_target_expected_counts_match():
    target = TargetDistribution.from_spec(
        {
            "joint": {
                "attributes": {"gender": ["f", "m"], "age": ["young", "old"]},
                "probs": [[0.45, 0.05], [0.3, 0.2]],
            }
        }
    )
    n = 40
    probs = {"gender": random_probs(1, n, 2), "age": random_probs(2, n, 2)}
    q = expected_targets(probs, target, num_draws=2000, generator=gen(0))
    assert abs(float(q["age"][:, 1].sum()) - n * 0.25) < 0.5
    assert abs(float(q["gender"][:, 0].sum()) - n * 0.5) < 0.5


@pytest.mark.parametrize("method", ["closed_form", "exact", "monte_carlo"])
def test_invalid_images_get_no_target(method):
    n = 10
    p = random_probs(5, n, 2)
    p[3] = float("nan")  # no face: whatever the classifier saw is garbage and must not matter
    valid = torch.ones(n, dtype=torch.bool)
    valid[[3, 7]] = False
    q = expected_targets({"gender": p}, binary(), valid=valid, method=method, generator=gen(1))["gender"]
    assert torch.equal(q[~valid], torch.zeros(2, 2))
    assert torch.allclose(q[valid].sum(1), torch.ones(8, dtype=q.dtype))
    # the OT runs over the 8 valid images only
    alone = expected_targets({"gender": p[valid]}, binary(), method=method, generator=gen(1))["gender"]
    assert torch.allclose(q[valid], alone)
    y = assign_targets({"gender": q}, threshold=0.5)["gender"]
    assert (y[~valid] == -1).all()
    none = expected_targets({"gender": p}, binary(), valid=torch.zeros(n, dtype=torch.bool), method=method)
    assert (assign_targets(none)["gender"] == -1).all()


def test_monte_carlo_is_reproducible_and_uses_the_generator():
    probs = {"gender": random_probs(1, 16, 2, 0.5), "race": random_probs(2, 16, 4, 0.5)}
    a = expected_targets(probs, gender_race(), num_draws=50, generator=gen(3))
    b = expected_targets(probs, gender_race(), num_draws=50, generator=gen(3))
    c = expected_targets(probs, gender_race(), num_draws=50, generator=gen(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_age_asymmetric_cost():
    age = binary(0.75, "age", ("young", "old"))
    p = {"age": random_probs(4, 12, 2, 1.0), "gender": random_probs(5, 12, 2, 1.0)}
    # a binary ranking is unchanged by the asymmetric cost: closed form and exact stay identical
    for method in ("closed_form", "exact"):
        sym = expected_targets(p, age, method=method)["age"]
        asym = expected_targets(p, age, method=method, age_asymmetric=True)["age"]
        assert torch.allclose(sym, asym)
    joint = TargetDistribution.from_spec(
        {
            "gender": {"classes": ["f", "m"], "probs": [0.5, 0.5]},
            "age": {"classes": ["young", "old"], "probs": [0.75, 0.25]},
        }
    )
    sym = expected_targets(p, joint, generator=gen(0))["age"]
    asym = expected_targets(p, joint, generator=gen(0), age_asymmetric=True)["age"]
    assert not torch.allclose(sym, asym)
    with pytest.raises(ValueError, match="age_asymmetric"):
        expected_targets({"gender": p["gender"]}, binary(), age_asymmetric=True)


def test_rejects_misuse():
    p2, p3 = random_probs(0, 6, 2), random_probs(0, 6, 3)
    with pytest.raises(ValueError, match="closed_form"):
        expected_targets({"race": p3}, single([0.2, 0.3, 0.5]), method="closed_form")
    with pytest.raises(ValueError, match="exact"):
        expected_targets({"gender": p2, "race": random_probs(1, 6, 4)}, gender_race(), method="exact")
    with pytest.raises(ValueError, match="method"):
        expected_targets({"gender": p2}, binary(), method="sinkhorn")
    with pytest.raises(ValueError, match="logits"):
        expected_targets({"gender": torch.randn(6, 2) * 3}, binary())
    with pytest.raises(ValueError, match="no entry"):
        expected_targets({"sex": p2}, binary())
    with pytest.raises(ValueError, match="shape"):
        expected_targets({"gender": p3}, binary())
    with pytest.raises(ValueError, match="valid"):
        expected_targets({"gender": p2}, binary(), valid=torch.ones(5, dtype=torch.bool))


def test_assign_targets_threshold():
    q = {"gender": torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.79, 0.21], [0.0, 0.0], [0.05, 0.95]])}
    assert assign_targets(q)["gender"].tolist() == [0, 0, -1, -1, 1]
    assert assign_targets(q, threshold=0.5)["gender"].tolist() == [0, 0, 0, -1, 1]
    with pytest.raises(ValueError):
        assign_targets(q, threshold=0.0)


def test_assign_targets_per_attribute_threshold():
    """A per-attribute C overrides the default for that attribute only."""
    q = {
        "gender": torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.1, 0.9]]),
        "age": torch.tensor([[0.7, 0.3], [0.45, 0.55], [0.1, 0.9]]),
    }
    y = assign_targets(q, threshold=0.8, per_attribute={"age": 0.5})
    assert y["gender"].tolist() == [-1, -1, 1]
    assert y["age"].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="age"):
        assign_targets(q, per_attribute={"age": 1.5})


def test_per_attribute_threshold_reaches_a_non_uniform_target():
    """Age 75/25, N = 16, closed-form expected OT on images ranked by p(old): with C = 0.6 only 3 images (ranks
    13-15) get a confident 'old' target, so a model already at 3/16 = 0.19 old is never pushed up; with C = 0.5
    for age the 4 top ranks get 'old', the target's 0.25."""
    p_old = torch.linspace(0.01, 0.99, 16)
    probs = {"age": torch.stack([1 - p_old, p_old], dim=1)}
    t = TargetDistribution.from_spec({"age": {"classes": ["young", "old"], "probs": [0.75, 0.25]}})
    q = expected_targets(probs, t)
    old_default = (assign_targets(q, 0.6)["age"] == 1).sum().item()
    old_age = (assign_targets(q, 0.6, {"age": 0.5})["age"] == 1).sum().item()
    assert old_default == 3 and old_age == 4


def test_separate_age_ot_asks_young_images_to_turn_old_where_the_joint_ot_does_not():
    """Gender x race x age (75/25), 16 confident images of which 3 old: the joint OT's 'old' mass spreads over the
    near-tied young images and only the 3 old ones get an 'old' target; age on its own gives 4 (the top ranks of
    p(old)) while gender x race stay one joint OT."""
    spec = {"gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]},
            "race": {"classes": ["white", "black", "indian", "asian"], "probs": [0.25] * 4},
            "age": {"classes": ["young", "old"], "probs": [0.75, 0.25]}}
    t = TargetDistribution.from_spec(spec)
    g = torch.Generator().manual_seed(1)
    n = 16

    def confident(lab: torch.Tensor, k: int) -> torch.Tensor:
        p = torch.full((n, k), 0.02 / (k - 1))
        p[torch.arange(n), lab] = 0.98
        p = p + 0.01 * torch.rand(n, k, generator=g)  # no exact ties
        return p / p.sum(1, keepdim=True)

    old = (torch.arange(n) < 3).long()
    probs = {"gender": confident(torch.randint(0, 2, (n,), generator=g), 2),
             "race": confident(torch.randint(0, 4, (n,), generator=g), 4), "age": confident(old, 2)}
    joint = assign_targets(expected_targets(probs, t, generator=torch.Generator().manual_seed(0)), 0.6, {"age": 0.5})
    q = expected_targets_separated(probs, t, ["age"], generator=torch.Generator().manual_seed(0))
    sep = assign_targets(q, 0.6, {"age": 0.5})
    assert int((joint["age"] == 1).sum()) <= 3
    assert int((sep["age"] == 1).sum()) == 4 and bool((sep["age"][:3] == 1).all())
    gxr = TargetDistribution.from_spec({"gender": spec["gender"], "race": spec["race"]})
    want = expected_targets({"gender": probs["gender"], "race": probs["race"]}, gxr,
                            generator=torch.Generator().manual_seed(0))
    for a in ("gender", "race"):
        torch.testing.assert_close(q[a], want[a])
    # nothing separate: exactly the joint OT
    torch.testing.assert_close(expected_targets_separated(probs, t, [], generator=torch.Generator().manual_seed(0)),
                               expected_targets(probs, t, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="independent"):
        expected_targets_separated({"gender": probs["gender"], "age": probs["age"]}, TargetDistribution.from_spec(
            {"joint": {"attributes": {"gender": ["f", "m"], "age": ["y", "o"]}, "probs": [[0.4, 0.1], [0.4, 0.1]]}}),
            ["age"])
    with pytest.raises(ValueError, match="not in the target"):
        expected_targets_separated(probs, t, ["hair"])
