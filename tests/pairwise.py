"""All-pairs (pairwise) test grids: every value of each parameter appears, and every pair of values of any two
parameters meets in at least one case, in far fewer cases than the full cartesian product (for the kernel grids,
~8 x 3 cases where the product has 288). Deterministic: the same parameters give the same cases on every run and
machine, so a failure is reproduced by its test id."""
from __future__ import annotations

import collections
import itertools
from typing import Any, Sequence

import pytest
import torch


def all_pairs(values: Sequence[Sequence[Any]]) -> list[tuple]:
    """Cases (one value per parameter, in the parameters' order) covering every pair of values of any two
    parameters. Greedy: a new case is built from each uncovered pair of the two parameters that still have the
    most uncovered pairs, giving every other parameter the value that covers the most uncovered pairs with the
    values already chosen (on a tie the value used least so far, so the cases spread evenly over e.g. a slow and a
    fast backend); the candidate covering the most is kept."""
    if any(len(options) == 0 for options in values):
        raise ValueError("every parameter needs at least one value")
    count = len(values)
    if count < 2:
        return [tuple(case) for case in itertools.product(*values)]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(count), 2)
                 for a in range(len(values[i])) for b in range(len(values[j]))}
    # Parameters with more values first: they have the most pairs to place.
    fill_order = sorted(range(count), key=lambda p: -len(values[p]))
    uses = [[0] * len(options) for options in values]

    def pairs_of(case: dict) -> set:
        return {(p, case[p], q, case[q]) for p, q in itertools.combinations(sorted(case), 2)}

    def completed(i, a, j, b) -> dict:
        case = {i: a, j: b}
        for p in fill_order:
            if p not in case:
                gains = [len(pairs_of({**case, p: v}) & uncovered) for v in range(len(values[p]))]
                case[p] = max(range(len(values[p])), key=lambda v: (gains[v], -uses[p][v], -v))
        return case

    cases = []
    while uncovered:
        per_params = collections.Counter((i, j) for i, _, j, _ in uncovered)
        busiest = max(sorted(per_params), key=per_params.get)
        candidates = [completed(*pair) for pair in sorted(uncovered) if (pair[0], pair[2]) == busiest]
        case = max(candidates, key=lambda c: len(pairs_of(c) & uncovered))
        uncovered -= pairs_of(case)
        for p, v in case.items():
            uses[p][v] += 1
        cases.append(tuple(case[p] for p in range(count)))
    return [tuple(values[p][index] for p, index in enumerate(case)) for case in sorted(cases)]


def value_id(name: str, value: Any) -> str:
    """A readable id part: strings as they are, shapes as 33x130, tuples of strings as affine-lu, dtypes as
    float32, anything else name=value."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return "-".join(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return f"{name}={value}"


# Every grid pairwise_cases built in this process: (parameter names, their values, the cases), which
# tests/test_pairwise.py checks.
GRIDS: list[tuple[list[str], list[list], list[tuple]]] = []


def pairwise_cases(**parameters: Sequence[Any]) -> list:
    """The all-pairs cases of `parameters` (name=values, in the test's argument order) as pytest.param's with ids
    such as "triton-affine-33x130-sliced-float32"; lists of them may be joined into one parametrize."""
    names = list(parameters)
    options = [list(values) for values in parameters.values()]
    cases = all_pairs(options)
    GRIDS.append((names, options, cases))
    return [pytest.param(*case, id="-".join(value_id(name, value) for name, value in zip(names, case)))
            for case in cases]


def pairwise_parametrize(**parameters: Sequence[Any]):
    """pytest.mark.parametrize over pairwise_cases(**parameters)."""
    return pytest.mark.parametrize(",".join(parameters), pairwise_cases(**parameters))
