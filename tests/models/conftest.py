"""Fixtures: the tiny random BERT on disk and the STS data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.models.tiny_bert import write_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sts_data_dir() -> Path:
    """$FLOWKERN_DATA, else the shared data next to the repository (../shared/data/sts)."""
    configured = os.environ.get("FLOWKERN_DATA")
    path = Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "data" / "sts"
    if not (path / "stsb-test.tsv.gz").is_file():
        pytest.skip(f"STS data not found at {path}; set FLOWKERN_DATA")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU idle-spinning threads slow
    these tests several fold; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
