"""tests/pairwise.py: its grids cover every value and every pair of values of any two parameters."""
from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from tests.pairwise import GRIDS, all_pairs, pairwise_parametrize

TESTS = Path(__file__).resolve().parent


def missing_values_and_pairs(values, cases) -> list:
    """What `cases` fail to cover: (parameter, value) never used, and (p, a, q, b) pairs that never meet."""
    missing = [(p, v) for p, options in enumerate(values) for v in options if all(case[p] != v for case in cases)]
    met = {(p, case[p], q, case[q]) for case in cases for p, q in itertools.combinations(range(len(values)), 2)}
    missing += [(p, a, q, b) for p, q in itertools.combinations(range(len(values)), 2)
                for a in values[p] for b in values[q] if (p, a, q, b) not in met]
    return missing


def test_the_check_catches_a_missing_value_and_a_missing_pair():
    values = [["a", "b"], [1, 2]]
    assert missing_values_and_pairs(values, [("a", 1), ("b", 2)]) == [(0, "a", 1, 2), (0, "b", 1, 1)]
    assert missing_values_and_pairs(values, [("a", 1), ("a", 2)]) == [(0, "b"), (0, "b", 1, 1), (0, "b", 1, 2)]
    assert missing_values_and_pairs(values, list(itertools.product(*values))) == []


# The generator depends only on how many values each parameter has. The kernel grids' sizes (e.g. backend x kind x
# shape x layout x dtype = 3 x 2 x 8 x 3 x 3); then one wide grid and every grid of 2 to 4 parameters of 1 to 4 values.
KERNEL_GRID_SIZES = [(3, 2, 8, 3, 3), (3, 8, 3, 3, 2), (3, 8, 3, 3), (3, 7, 4, 2), (2, 5, 4), (3, 2, 2, 2, 2, 2, 2)]
SMALL_GRID_SIZES = ([(4, 4, 4, 4, 4, 4, 4, 4)]
                    + [sizes for count in (2, 3, 4) for sizes in itertools.product(range(1, 5), repeat=count)])


@pytest.mark.parametrize("sizes", KERNEL_GRID_SIZES)
def test_kernel_sized_grids_cover_every_pair_in_far_fewer_cases(sizes):
    values = [[f"p{p}v{v}" for v in range(size)] for p, size in enumerate(sizes)]
    cases = all_pairs(values)
    assert missing_values_and_pairs(values, cases) == []
    largest, second = sorted(sizes)[-2:]
    # At least largest x second cases are needed; greedy stays within 1.5x of that here.
    assert largest * second <= len(cases) <= 1.5 * largest * second < math.prod(sizes)


def test_every_small_grid_covers_every_value_and_pair():
    for sizes in SMALL_GRID_SIZES:
        values = [list(range(size)) for size in sizes]
        cases = all_pairs(values)
        assert missing_values_and_pairs(values, cases) == [], sizes
        assert len(cases) <= math.prod(sizes) and len(set(cases)) == len(cases), sizes


def test_every_grid_of_the_test_suite_covers_every_value_and_pair():
    # The test modules' grids, as pytest collects them: each module that builds one is loaded (again) here.
    users = [path for path in sorted(TESTS.rglob("test_*.py")) if "pairwise_" in path.read_text()
             and path != Path(__file__).resolve()]
    assert len(users) >= 9, users
    for path in users:
        spec = importlib.util.spec_from_file_location(f"pairwise_user_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    checked = {tuple(names) for names, _, _ in GRIDS}
    assert ("impl", "kind", "shape", "layout", "dtype") in checked and len(GRIDS) >= 15
    for names, options, cases in GRIDS:
        assert missing_values_and_pairs(options, cases) == [], names
        assert len(cases) < math.prod(map(len, options)) or len(options) <= 2, names


def test_two_parameters_give_the_full_product_and_one_gives_its_values():
    assert sorted(all_pairs([[1, 2, 3], "ab"])) == sorted(itertools.product([1, 2, 3], "ab"))
    assert all_pairs([[1, 2, 3]]) == [(1,), (2,), (3,)]
    with pytest.raises(ValueError, match="at least one value"):
        all_pairs([[1, 2], []])


def test_the_grid_is_the_same_on_every_call():
    values = [list(range(8)), list(range(3)), list(range(3)), list(range(3)), list(range(2))]
    assert all_pairs(values) == all_pairs([list(v) for v in values])


def test_parametrize_ids_are_readable():
    mark = pairwise_parametrize(impl=["triton", "cpp"], shape=[(33, 130), (3, 6, 3, 5)],
                                dtype=[torch.float32, torch.bfloat16], affine=[False, True])
    assert mark.args[0] == "impl,shape,dtype,affine"
    ids = [case.id for case in mark.args[1]]
    assert len(ids) == len(set(ids))
    assert ids[0] == "triton-33x130-float32-affine=False"
    assert all(case_id.count("-") == 3 for case_id in ids)
