"""Shared pytest fixtures. Server fixtures (S3, Ray) live in tests/fixtures/ and are session-scoped."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = [
    "tests.fixtures.s3server",
    "tests.fixtures.raycluster",
    "tests.fixtures.slurm",
]
