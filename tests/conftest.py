import os
from pathlib import Path

import pytest

from mr_ray.cluster import use_serve_environment

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
use_serve_environment()  # the tests' local cluster serves as `mr-ray serve` does

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT = REPO.parent / "shared" / "data" / "homedepot"


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster for the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def homedepot():
    if not (HOMEDEPOT / "judgments.parquet").exists():
        pytest.skip(f"Home Depot data not present at {HOMEDEPOT}")
    return HOMEDEPOT
