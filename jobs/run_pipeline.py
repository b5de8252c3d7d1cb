"""`ray job submit` entry point: run the mr-ray pipeline (or some stages) on the cluster.

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/run_pipeline.py --config jobs/configs/sample.yaml --run-dir runs/sample
"""

import argparse
import sys
import time
from pathlib import Path

import ray

from mr_ray.cli import BAD_INPUT, BAD_INPUT_EXIT, error_line
from mr_ray.config import load_config
from mr_ray.pipeline import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="run config YAML")
    parser.add_argument("--run-dir", type=Path, required=True, help="stage outputs (path on the cluster's shared storage)")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--force", action="store_true", help="re-run stages whose manifest matches")
    parser.add_argument("--debug", action="store_true", help="show the traceback of bad input too")
    args = parser.parse_args()

    try:
        config = load_config(args.config)
        ray.init()  # inside `ray job submit`, RAY_ADDRESS points at the cluster
        started = time.perf_counter()
        outcome = run_pipeline(config, args.run_dir, only=args.stage, force=args.force)
    except BAD_INPUT as err:
        if args.debug:
            raise
        print(error_line(err), file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT)
    print(f"[mr-ray] pipeline finished in {time.perf_counter() - started:.1f} s: {outcome}")
    report = args.run_dir / "evaluate" / "report.md"
    if report.exists():
        print(f"[mr-ray] report: {report.resolve()}")
        print(report.read_text())


if __name__ == "__main__":
    main()
