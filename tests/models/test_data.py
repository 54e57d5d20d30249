import gzip
from pathlib import Path

import numpy as np
import pytest

from flowkern.data import DATA_ENV_VAR, TASKS, DataDirError, fit_sentences, load_task, read_pairs, resolve_data_dir


def write_tsv(path: Path, rows: list[str], header: str = "score\tsentence1\tsentence2") -> Path:
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.write("\n".join([header, *rows]) + "\n")
    return path


def test_data_dir_missing_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(DataDirError, match=f"--data-dir.*{DATA_ENV_VAR}"):
        resolve_data_dir()


def test_data_dir_explicit_beats_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "elsewhere"))
    assert resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(DataDirError, match=DATA_ENV_VAR):
        resolve_data_dir()


def test_missing_task_file_is_a_data_dir_error(tmp_path):
    with pytest.raises(DataDirError, match="stsb-test.tsv.gz"):
        load_task("stsb", tmp_path)


def test_read_pairs_splits_on_tabs_only(tmp_path):
    rows = ['4.5\tHe said "yes\tShe said "no" ,\tMSRpar', "1\t  leading space\ttrailing \tOnWN"]
    pairs = read_pairs(write_tsv(tmp_path / "x.tsv.gz", rows, "score\tsentence1\tsentence2\tsubset"))
    assert pairs.sentences1 == ['He said "yes', "  leading space"]
    assert pairs.sentences2 == ['She said "no" ,', "trailing "]
    assert pairs.scores.tolist() == [4.5, 1.0]
    assert pairs.subsets == ["MSRpar", "OnWN"]
    assert pairs.sentences() == ['He said "yes', 'She said "no" ,', "  leading space", "trailing "]


def test_read_pairs_reports_malformed_line(tmp_path):
    path = write_tsv(tmp_path / "bad.tsv.gz", ["1\ta\tb", "2\tonly one sentence"])
    with pytest.raises(ValueError, match=r"bad.tsv.gz:3: expected 3"):
        read_pairs(path)


def test_max_pairs_is_a_seeded_subset_in_file_order(tmp_path):
    rows = [f"{i}\ts{i}\tt{i}" for i in range(50)]
    path = write_tsv(tmp_path / "x.tsv.gz", rows)
    subset = read_pairs(path, max_pairs=10, seed=3)
    assert len(subset) == 10 and subset.scores.tolist() == sorted(subset.scores.tolist())
    assert subset.sentences1 == read_pairs(path, max_pairs=10, seed=3).sentences1
    assert subset.sentences1 != read_pairs(path, max_pairs=10, seed=4).sentences1
    assert all(f"s{int(score)}" == s for score, s in zip(subset.scores, subset.sentences1))


def test_unknown_task_and_setting(sts_data_dir):
    with pytest.raises(ValueError, match="unknown STS task"):
        load_task("sts17", sts_data_dir)
    with pytest.raises(ValueError, match="unknown setting"):
        fit_sentences("stsb", "test", sts_data_dir)


@pytest.mark.parametrize("task, n_pairs, subsets", [
    ("stsb", 1379, None), ("sickr", 4927, None), ("sts12", 3108, 5), ("sts13", 1500, 3), ("sts14", 3750, 6),
    ("sts15", 3000, 5), ("sts16", 1186, 5),
])
def test_task_sizes_match_senteval(sts_data_dir, task, n_pairs, subsets):
    pairs = load_task(task, sts_data_dir)
    assert len(pairs) == n_pairs
    assert (pairs.subsets is None) if subsets is None else len(set(pairs.subsets)) == subsets
    assert np.all((pairs.scores >= 0) & (pairs.scores <= 5))


def test_fit_corpora(sts_data_dir):
    assert set(TASKS) == {"stsb", "sickr", "sts12", "sts13", "sts14", "sts15", "sts16"}
    assert len(fit_sentences("stsb", "target", sts_data_dir)) == 2 * (5749 + 1500 + 1379)
    assert len(fit_sentences("sickr", "target", sts_data_dir)) == 2 * (4500 + 500 + 4927)
    train = fit_sentences("sts13", "train", sts_data_dir)
    assert len(train) == 2 * 5749 and train[:2] == ["A plane is taking off.", "An air plane is taking off."]
    test_pairs = load_task("stsb", sts_data_dir, max_pairs=20)
    capped = fit_sentences("stsb", "target", sts_data_dir, max_pairs=20)
    assert len(capped) == 3 * 2 * 20 and set(test_pairs.sentences()) <= set(capped)
