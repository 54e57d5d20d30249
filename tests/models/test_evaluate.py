import numpy as np
import pytest
from scipy.stats import spearmanr

from flowkern.data import StsPairs
from flowkern.models import evaluate_pairs, spearman_cosine


def random_pairs(n, subsets=None, seed=0):
    rng = np.random.default_rng(seed)
    vectors = {}
    s1, s2 = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]
    for s in s1 + s2:
        vectors[s] = rng.normal(size=4)
    return StsPairs(s1, s2, rng.uniform(0, 5, n), subsets), vectors


def cosine(u, v):
    return u @ v / np.linalg.norm(u) / np.linalg.norm(v)


def test_spearman_cosine_is_rank_correlation_times_100():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    cos = np.array([cosine(u, v) for u, v in zip(a, b)])
    assert spearman_cosine(a, b, cos * 2 + 1) == pytest.approx(100.0)
    assert spearman_cosine(a, b, -cos) == pytest.approx(-100.0)
    gold = rng.uniform(size=30)
    assert spearman_cosine(a, b, gold) == pytest.approx(100 * spearmanr(cos, gold).statistic)


def test_all_and_wmean_aggregates():
    subsets = ["x"] * 10 + ["y"] * 30
    pairs, vectors = random_pairs(40, subsets)
    calls = []

    def embed(sentences):
        calls.append(len(sentences))
        return np.stack([vectors[s] for s in sentences])

    score = evaluate_pairs(embed, pairs, "toy")
    cos = np.array([cosine(vectors[a], vectors[b]) for a, b in zip(pairs.sentences1, pairs.sentences2)])
    rho = {name: 100 * spearmanr(cos[rows], pairs.scores[rows]).statistic
           for name, rows in (("x", slice(0, 10)), ("y", slice(10, 40)))}
    assert calls == [80]
    assert score.all == pytest.approx(100 * spearmanr(cos, pairs.scores).statistic)
    assert score.subsets == pytest.approx(rho)
    assert score.wmean == pytest.approx((10 * rho["x"] + 30 * rho["y"]) / 40)
    assert score.n_pairs == 40 and score.wmean != pytest.approx(score.all)


def test_without_subsets_wmean_is_all():
    pairs, vectors = random_pairs(25)
    score = evaluate_pairs(lambda s: np.stack([vectors[x] for x in s]), pairs)
    assert score.wmean == score.all and score.subsets == {}
