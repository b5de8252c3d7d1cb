"""Run the Ray Tune sweep stage with a sweep definition from this folder.

    python tune/run_sweep.py --config jobs/configs/sample.yaml --sweep tune/sample.yaml --run-dir runs/sample

Runs the run's graph up to the sweep (prepare, the judge's stages, stage1, mine; reused when
their manifests match), then the sweep. The best parameters land in
<run-dir>/sweep/best_params.json; the pipeline's stage2 trains with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (default: built-in sample config)")
    parser.add_argument("--sweep", type=Path, required=True, help="sweep definition YAML (a `sweep:` section)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sample"))
    parser.add_argument("--address", default=None, help="Ray address (default: a local cluster)")
    args = parser.parse_args()

    import ray

    from mr_ray.config import load_config
    from mr_ray.pipeline import run_pipeline

    definition = yaml.safe_load(args.sweep.read_text()) or {}
    config = load_config(args.config, {"sweep": definition.get("sweep", {})})
    ray.init(address=args.address)
    run_pipeline(config, args.run_dir, until="sweep")
    print(f"best parameters: {args.run_dir / 'sweep' / 'best_params.json'}")


if __name__ == "__main__":
    main()
