"""All-pairs (pairwise) test grids: every value of each parameter appears, and every pair of values of any two
parameters meets in at least one case, in far fewer cases than the full cartesian product (for the kernel grids,
~8 x 3 cases where the product has 288). Deterministic: the same parameters give the same cases on every run and
machine, so a failure is reproduced by its test id."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import pytest
import torch


def all_pairs(values: Sequence[Sequence[Any]]) -> list[tuple]:
    """Cases (one value per parameter, in the parameters' order) covering every pair of values of any two
    parameters. Greedy: each new case starts from the first pair not yet covered and gives every other parameter
    the value that covers the most uncovered pairs with the values already chosen (the first such value on a tie).
    """
    if any(len(options) == 0 for options in values):
        raise ValueError("every parameter needs at least one value")
    count = len(values)
    if count < 2:
        return [tuple(case) for case in itertools.product(*values)]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(count), 2)
                 for a in range(len(values[i])) for b in range(len(values[j]))}
    # Parameters with more values first: they have the most pairs to place.
    fill_order = sorted(range(count), key=lambda p: -len(values[p]))
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        case = {i: a, j: b}
        for p in fill_order:
            if p in case:
                continue
            gains = [sum((min(p, q), v if p < q else w, max(p, q), w if p < q else v) in uncovered
                         for q, w in case.items()) for v in range(len(values[p]))]
            case[p] = gains.index(max(gains))
        uncovered -= {(p, case[p], q, case[q]) for p, q in itertools.combinations(range(count), 2)}
        cases.append(tuple(case[p] for p in range(count)))
    return [tuple(values[p][index] for p, index in enumerate(case)) for case in sorted(cases)]


def value_id(name: str, value: Any) -> str:
    """A readable id part: strings as they are, shapes as 33x130, dtypes as float32, anything else name=value."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return f"{name}={value}"


def pairwise_parametrize(**parameters: Sequence[Any]):
    """pytest.mark.parametrize over the all-pairs cases of `parameters` (name=values, in the test's argument
    order), with ids such as "triton-affine-33x130-sliced-float32"."""
    names = list(parameters)
    cases = all_pairs([list(values) for values in parameters.values()])
    ids = ["-".join(value_id(name, value) for name, value in zip(names, case)) for case in cases]
    return pytest.mark.parametrize(",".join(names), cases, ids=ids)
