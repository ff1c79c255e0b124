"""Expected optimal-transport targets for the distributional alignment loss (METHOD.md section 2).

Notation (paper names):
- n valid images (a face was found), attribute a with K_a classes, J = prod_a K_a joint classes in the
  row-major order of ``TargetDistribution.joint_classes()``; ``pi`` (J,) the target's joint probabilities;
- p_i^a (K_a,) predicted class probabilities of image i; e^a(j) the one-hot of joint class j's class of a;
- cost C_ij = sqrt(sum_a ||p_i^a - e^a(j)||^2)                            (METHOD.md section 2, "joint");
- a target draw u_1..u_n ~ D iid is, for the assignment, only its histogram b ~ Multinomial(n, pi);
  T_b (n, J) = the optimal plan with row sums 1 and column sums b (an assignment: entries are 0/1);
- the expected OT target q_i = E_b[T_b[i]] (row i sums to 1), marginalised per attribute.

Three ways to take E_b, all the same quantity:
1. ``closed_form`` - one binary attribute: 1-D OT gives class 0 to the n_0 images that are cheapest to move
   to class 0 (lowest rank r_i of C_i0 - C_i1, i.e. lowest p(class 1)), n_0 ~ Binomial(n, rho), so
   q_i(class 0) = P(n_0 > r_i) = 1 - P(Bin(n, rho) <= r_i) exactly.
2. ``exact`` - one attribute: enumerate count vectors b in descending multinomial probability until
   ``coverage`` of the mass is covered, solve each assignment, average with renormalised probabilities.
3. ``monte_carlo`` - any attributes: average T_b over ``num_draws`` histograms drawn from ``generator``.

Ties: images with identical predictions (e.g. saturated classifier outputs) are interchangeable, so any
optimal plan is as good as its permutations; we average q over each group of identical rows (the closed
form: over equal cost differences). That is the expectation under a random tie-break and keeps the result
permutation-equivariant. The assignment itself uses POT's exact network simplex (``ot.emd``) on the
(n, J) transport problem, which is the same optimum as the n x n assignment to the multiset of one-hots.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ot as pot
import torch
from scipy.stats import binom

from fairdiff_ray.core.targets import TargetDistribution

METHODS = ("auto", "closed_form", "exact", "monte_carlo")
# auto uses the exact path only while it needs at most this many assignments (~60 us each at n=64, K=4);
# beyond it Monte-Carlo with num_draws assignments is cheaper for the same accuracy.
AUTO_MAX_COUNT_VECTORS = 4000
# an explicit method="exact" refuses problems this large instead of running for minutes.
HARD_MAX_COUNT_VECTORS = 200_000
_ROW_SUM_TOL = 1e-3  # softmax outputs in float16/32 sum to 1 only approximately


def _check_inputs(
    probs: dict[str, torch.Tensor], target: TargetDistribution, valid: torch.Tensor | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Validate shapes and values; return the valid rows in float64 numpy and the (N,) valid mask."""
    missing = [a for a in target.names if a not in probs]
    if missing:
        raise ValueError(f"probs has no entry for target attribute(s) {missing} (got {sorted(probs)})")
    sizes = {a: tuple(probs[a].shape) for a in target.names}
    n_all = sizes[target.names[0]][0] if len(sizes[target.names[0]]) == 2 else -1
    for a, k in target.num_classes.items():
        if sizes[a] != (n_all, k):
            raise ValueError(
                f"probs[{a!r}] has shape {sizes[a]}, expected (N, {k}) with the same N for every attribute"
            )
    if valid is None:
        mask = np.ones(n_all, dtype=bool)
    else:
        mask = valid.detach().cpu().numpy()
        if mask.dtype != np.bool_ or mask.shape != (n_all,):
            raise ValueError(
                f"valid must be a bool tensor of shape ({n_all},), got {valid.dtype} {tuple(valid.shape)}"
            )
    rows = {}
    for a in target.names:
        p = probs[a].detach().cpu().double().numpy()[mask]
        if p.size and (
            not np.isfinite(p).all() or p.min() < -1e-6 or np.abs(p.sum(1) - 1).max() > _ROW_SUM_TOL
        ):
            raise ValueError(
                f"probs[{a!r}] rows of valid images must be class probabilities (finite, >= 0, summing to 1): "
                "pass softmax outputs, not logits, and mark images without a face in `valid`"
            )
        rows[a] = p
    return rows, mask


def _age_weights(target: TargetDistribution, age_asymmetric: bool) -> dict[str, np.ndarray]:
    """W_a (K_a, K_a): weight of component c in the squared cost to target class k (all ones by default).

    The reference penalises calling a young-looking face 'old' harder: for target 'old' the p(young)
    component of the squared distance counts twice. Our reading of "doubles the p(young) term".
    """
    weights = {a: np.ones((k, k)) for a, k in target.num_classes.items()}
    if age_asymmetric:
        classes = target.attributes.get("age")
        if classes is None or "young" not in classes or "old" not in classes:
            raise ValueError(
                "age_asymmetric needs a target attribute 'age' with classes 'young' and 'old' "
                f"(target has {target.attributes}): turn loss.age_asymmetric_cost off or rename the classes"
            )
        weights["age"][classes.index("old"), classes.index("young")] = 2.0
    return weights


def _sq_costs(p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, K) weighted squared distances sum_c W[k, c] (p_ic - delta_kc)^2 to each one-hot e_k."""
    k = p.shape[1]
    diff = p[:, None, :] - np.eye(k)[None]
    return (weights[None] * diff**2).sum(-1)


def _joint_cost(
    rows: dict[str, np.ndarray], target: TargetDistribution, weights: dict[str, np.ndarray]
) -> np.ndarray:
    """(n, J) C_ij = sqrt(sum_a ||p_i^a - e^a(j)||^2)."""
    classes = np.asarray(target.joint_classes(), dtype=np.int64).reshape(target.num_joint, len(target.names))
    sq = sum(_sq_costs(rows[a], weights[a])[:, classes[:, col]] for col, a in enumerate(target.names))
    return np.ascontiguousarray(np.sqrt(sq))


def _tie_average(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Average the rows of q (n, J) over groups of identical rows of keys (n, D)."""
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if len(counts) == len(q):
        return q
    sums = np.zeros((len(counts), q.shape[1]))
    np.add.at(sums, inverse, q)
    return sums[inverse] / counts[inverse, None]


def _closed_form(cost: np.ndarray, rho: float) -> np.ndarray:
    """(n, 2) q for one binary attribute; rho = target probability of class 0.

    Rank r_i of d_i = C_i0 - C_i1 ascending (images cheapest to send to class 0 first); class 0 goes to
    the n_0 ~ Bin(n, rho) lowest ranks: q_i(class 0) = P(n_0 > r_i) = binom.sf(r_i, n, rho).
    """
    n = len(cost)
    d = cost[:, 0] - cost[:, 1]
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(d, kind="stable")] = np.arange(n)
    q0 = binom.sf(ranks, n, rho)
    q = np.stack([q0, 1.0 - q0], axis=1)
    return _tie_average(q, d[:, None])


def _multinomial_mode(n: int, pi: np.ndarray, logpi: np.ndarray) -> list[int]:
    """A mode of Multinomial(n, pi) (pi > 0): round n * pi, then hill-climb by unit moves.

    log pmf is separable concave in the counts (M-concave), so a point no unit move improves is a mode.
    """
    counts = np.floor(n * pi).astype(np.int64)
    frac_order = np.argsort(-(n * pi - counts), kind="stable")
    counts[frac_order[: n - counts.sum()]] += 1
    c = counts.tolist()
    while True:
        best, move = 1e-12, None
        for a in range(len(c)):
            for b in range(len(c)):
                if a != b and c[a] > 0:
                    gain = math.log(c[a]) - math.log(c[b] + 1) + logpi[b] - logpi[a]
                    if gain > best:
                        best, move = gain, (a, b)
        if move is None:
            return c
        c[move[0]] -= 1
        c[move[1]] += 1


def _count_vectors(
    n: int, pi: np.ndarray, coverage: float, max_vectors: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Count vectors b (V, J) of Multinomial(n, pi) in descending probability until their mass >= coverage.

    Best-first search from the mode over unit moves (one count from class a to class b): every non-mode
    vector has a strictly more probable neighbour (M-concavity), so vectors pop in descending order.
    Returns (counts, probabilities renormalised to sum 1), or None when more than max_vectors are needed.
    """
    support = np.flatnonzero(pi > 0)
    logpi = np.log(pi[support]).tolist()
    start = _multinomial_mode(n, pi[support], np.asarray(logpi))
    log_start = math.lgamma(n + 1) + sum(c * lp - math.lgamma(c + 1) for c, lp in zip(start, logpi))
    heap = [(-log_start, tuple(start))]
    seen = {tuple(start)}
    found, mass_list, mass = [], [], 0.0
    while heap and mass < coverage:
        if len(found) >= max_vectors:
            return None
        neg_log, c = heapq.heappop(heap)
        found.append(c)
        mass_list.append(math.exp(-neg_log))
        mass += mass_list[-1]
        for a in range(len(c)):
            if c[a] == 0:
                continue
            for b in range(len(c)):
                if b == a:
                    continue
                nb = list(c)
                nb[a] -= 1
                nb[b] += 1
                nb = tuple(nb)
                if nb not in seen:
                    seen.add(nb)
                    step = math.log(c[a]) - math.log(c[b] + 1) + logpi[b] - logpi[a]
                    heapq.heappush(heap, (neg_log - step, nb))
    counts = np.zeros((len(found), len(pi)))
    counts[:, support] = np.asarray(found, dtype=np.float64)
    w = np.asarray(mass_list)
    return counts, w / w.sum()


def _draw_histograms(
    n: int, pi: np.ndarray, num_draws: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """num_draws histograms b ~ Multinomial(n, pi), deduplicated: (unique (V, J), weights (V,) summing to 1)."""
    draws = rng.multinomial(n, pi / pi.sum(), size=num_draws)
    unique, mult = np.unique(draws, axis=0, return_counts=True)
    return unique.astype(np.float64), mult / num_draws


def _expected_plan(cost: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, J) sum_v weights_v * T_v, T_v the exact EMD plan from n unit-mass images to histogram counts_v."""
    ones = np.ones(len(cost))
    q = np.zeros_like(cost)
    for b, w in zip(counts, weights):
        q += w * pot.emd(ones, b, cost)
    return q / q.sum(1, keepdims=True)


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy Generator derived deterministically from the torch one (seed 0 when none is given)."""
    if generator is None:
        return np.random.default_rng(0)
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
    return np.random.default_rng(int(seed))


def expected_targets(
    probs: dict[str, torch.Tensor],
    target: TargetDistribution,
    *,
    valid: torch.Tensor | None = None,
    method: str = "auto",
    num_draws: int = 200,
    generator: torch.Generator | None = None,
    age_asymmetric: bool = False,
    coverage: float = 0.95,
) -> dict[str, torch.Tensor]:
    """Expected OT targets q per attribute of ``target`` (METHOD.md section 2, step 3).

    probs: attribute -> (N, K_a) class probabilities of all N gathered images (softmax, not logits);
        attributes not in ``target`` are ignored.
    valid: (N,) bool, False for images without a face; only valid images take part (the target draw has
        n = valid.sum() samples) and their q rows are all zeros. None = all valid.
    method: "auto" (closed_form for one binary attribute, exact for one attribute with K > 2 while it needs
        at most AUTO_MAX_COUNT_VECTORS assignments, else monte_carlo), "closed_form", "exact", "monte_carlo".
    num_draws, generator: Monte-Carlo only; draws come only from ``generator`` (seed 0 when None).
    age_asymmetric: double the p(young) term of the cost to 'old' targets (the reference's age cost). It
        does not change a single binary attribute's ranking, so only the exact / Monte-Carlo paths differ.
    coverage: probability mass of the count vectors the exact path enumerates.
    Returns attribute -> (N, K_a) float tensors like ``probs`` (rows of valid images sum to 1).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if num_draws < 1 or not 0 < coverage <= 1:
        raise ValueError(f"need num_draws >= 1 and 0 < coverage <= 1, got {num_draws}, {coverage}")
    single = len(target.names) == 1
    binary = single and target.num_joint == 2
    if method == "closed_form" and not binary:
        raise ValueError(f"method='closed_form' needs one binary attribute, target has {target.num_classes}")
    if method == "exact" and not single:
        raise ValueError(f"method='exact' needs one attribute, target has {target.names}: use 'monte_carlo'")
    rows, mask = _check_inputs(probs, target, valid)
    weights = _age_weights(target, age_asymmetric)
    n = int(mask.sum())
    q_joint = np.zeros((n, target.num_joint))
    if n:
        cost = _joint_cost(rows, target, weights)
        pi = target.joint_probs.double().numpy()
        if method == "auto":
            method = "closed_form" if binary else "exact" if single else "monte_carlo"
            limit = AUTO_MAX_COUNT_VECTORS
        else:
            limit = HARD_MAX_COUNT_VECTORS
        if method == "closed_form":
            q_joint = _closed_form(cost, float(pi[0]))
        else:
            plan = _count_vectors(n, pi, coverage, limit) if method == "exact" else None
            if plan is None and method == "exact" and limit == HARD_MAX_COUNT_VECTORS:
                raise ValueError(
                    f"method='exact' needs over {limit} assignments for n={n}, K={target.num_joint} at "
                    f"coverage={coverage}: use method='monte_carlo' or 'auto'"
                )
            if plan is None:
                plan = _draw_histograms(n, pi, num_draws, _numpy_rng(generator))
            keys = np.concatenate([rows[a] for a in target.names], axis=1)
            q_joint = _tie_average(_expected_plan(cost, *plan), keys)
    return _marginals(q_joint, mask, target, probs)


def _marginals(
    q_joint: np.ndarray, mask: np.ndarray, target: TargetDistribution, probs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per attribute (N, K_a): sum q_joint over the joint classes with that class; zero rows where invalid."""
    classes = np.asarray(target.joint_classes(), dtype=np.int64).reshape(target.num_joint, len(target.names))
    out = {}
    for col, a in enumerate(target.names):
        k = target.num_classes[a]
        full = np.zeros((len(mask), k))
        onehot = np.eye(k)[classes[:, col]]  # (J, K_a)
        full[mask] = q_joint @ onehot
        ref = probs[a]
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        out[a] = torch.as_tensor(full, dtype=dtype, device=ref.device)
    return out


def expected_targets_separated(
    probs: dict[str, torch.Tensor], target: TargetDistribution, separate: Sequence[str], **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Expected OT targets with the ``separate`` attributes of an independent target each computed on its own
    marginal and the others jointly, as ``expected_targets`` does for all (``loss.ot_separate``; keyword
    arguments as ``expected_targets``).

    Why: in the joint OT a minority class of one attribute competes with the others' costs. With confident
    predictions every 'young' image costs the same to send to an 'old' class, so which one goes changes from
    draw to draw with the other attributes, the expected 'old' mass spreads thinly over all of them and none
    reaches the confidence to be assigned: with gender x race x age (75/25) and 16 images the joint OT asked
    for as many old images as there already were. On its own, a binary attribute ranks the images and the
    closed form gives the top ranks the target's share. A joint table (dependent attributes) has no such split.
    """
    if not separate:
        return expected_targets(probs, target, **kwargs)
    unknown = [a for a in separate if a not in target.attributes]
    if unknown:
        raise ValueError(f"separate attribute(s) {unknown} are not in the target (has {target.names})")
    if not target.independent:
        raise ValueError("separate OT per attribute needs a target of independent attributes, not a joint table")
    groups = [[a] for a in separate] + [[a for a in target.names if a not in separate]]
    out: dict[str, torch.Tensor] = {}
    for names in (g for g in groups if g):
        probs_g = torch.ones((), dtype=torch.float64)
        for a in names:  # independent: the group's joint table is the outer product of its marginals
            probs_g = probs_g.unsqueeze(-1) * target.marginal(a).to(torch.float64)
        sub = TargetDistribution({a: list(target.attributes[a]) for a in names}, probs_g, independent=True)
        out.update(expected_targets({a: probs[a] for a in names}, sub, **kwargs))
    return out


def assign_targets(
    q: dict[str, torch.Tensor], threshold: float = 0.8, per_attribute: Mapping[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Confident targets y_i = argmax q_i where max q_i >= threshold (the C of METHOD.md), else -1.

    q: attribute -> (N, K_a) expected targets; all-zero rows (images without a face) get -1.
    per_attribute: attribute -> its own C, overriding ``threshold`` for that attribute.
    Returns attribute -> (N,) long.
    """
    if not isinstance(q, dict):
        raise ValueError(f"assign_targets takes attribute -> (N, K) tensors, got {type(q).__name__}")
    per_attribute = dict(per_attribute or {})
    for name, c in [("threshold", threshold), *per_attribute.items()]:
        if not 0 < c <= 1:
            raise ValueError(f"threshold {name!r} must be in (0, 1], got {c}")
    out = {}
    for a, qa in q.items():
        if qa.dim() != 2:
            raise ValueError(f"q[{a!r}] must be (N, K), got shape {tuple(qa.shape)}")
        c = per_attribute.get(a, threshold)
        conf, arg = qa.double().max(dim=1)
        # q from draw averages lands on k/num_draws; the tolerance keeps 160/200 == 0.8 confident
        out[a] = torch.where(conf >= c - 1e-9, arg, torch.full_like(arg, -1))
    return out
