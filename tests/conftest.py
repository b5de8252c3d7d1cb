import os
from pathlib import Path

import pytest

from mr_ray.cluster import SERVE_ENVIRONMENT

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _key, _value in SERVE_ENVIRONMENT.items():  # the tests' local cluster serves as `mr-ray serve` does
    os.environ.setdefault(_key, _value)

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
