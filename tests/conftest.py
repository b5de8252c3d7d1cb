import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mr_ray.cluster import private_serve_side, use_serve_environment
from mr_ray.serve.ports import PORT_RANGE

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The content-addressed cache (catalog embeddings, the st-mnrl baseline) of this test process and the jobs it
# starts: shared by its tests (the same tiny catalogs are embedded once), never the user's ~/.cache/mr-ray.
os.environ["MR_RAY_CACHE"] = tempfile.mkdtemp(prefix="mr-ray-test-cache-")
atexit.register(shutil.rmtree, os.environ["MR_RAY_CACHE"], ignore_errors=True)  # ours: this process made it
use_serve_environment()  # the tests' local cluster serves as `mr-ray serve` does
# Each test worker's Serve has its own HAProxy files and side ports: two workers' clusters (test_serve.py beside
# test_pages.py) would otherwise share Ray's fixed ones (mr_ray.cluster.SERVE_SIDE_PORTS says what goes wrong).
# Ports apart too: worker N picks its free ports (side ports, each service's HTTP port) from its own thousand.
_WORKER_LOW = int(PORT_RANGE.split("-")[0]) + 1000 * (int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")) % 10)
os.environ["MR_RAY_PORT_RANGE"] = f"{_WORKER_LOW}-{_WORKER_LOW + 999}"
_HAPROXY = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
private_serve_side(_HAPROXY, keep_free_defaults=False)
atexit.register(shutil.rmtree, _HAPROXY, ignore_errors=True)  # ours: this process made it

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


# The slowest files first: `scripts/test.sh` runs the suite on pytest-xdist workers, a whole file per worker
# (--dist loadfile), and a long file that starts last would leave the other worker idle at the end.
SLOWEST_FIRST = ("test_e2e_job.py", "test_drills.py", "test_train.py", "test_labeler_vllm.py", "test_serve.py", "test_pages.py",
                 "test_index.py", "test_judge_cross_encoder.py", "test_st_baseline.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
