"""Shared pytest fixtures. Server fixtures (S3, Ray, Slurm) live in tests/fixtures/ and are session-scoped."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = [
    "tests.fixtures.s3server",
    "tests.fixtures.raycluster",
    "tests.fixtures.slurm",
]


@pytest.fixture
def one_thread():
    """Tiny models on the 2-core CI machine: a second OpenMP thread mostly spin-waits against other processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
