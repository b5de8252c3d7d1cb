"""sweep: Ray Tune over Stage 2's circle and SupCon settings on dev (mr_ray.retriever.sweep); best_params.json feeds stage2."""

from __future__ import annotations

import json

from mr_ray.retriever.examples import read_frame
from mr_ray.retriever.sweep import BEST_PARAMS, OBJECTIVE, run_sweep, sweep_data


def sweep_stage(ctx) -> dict:
    """Sweep Stage 2 from the Stage-1 encoder on dev; writes best_params.json, which `stage2` trains with."""
    config = ctx.config
    mined = read_frame(ctx.input("mine"), "mined") if config.stage2.use_mined else None
    data = sweep_data(ctx.input("prepare"), config, mined, ctx.inputs_of("judgments"))
    best = run_sweep(config, str(ctx.input("stage1") / "model"), data["examples"], data["dev"], (ctx.out / "tune").resolve())
    (ctx.out / BEST_PARAMS).write_text(json.dumps(best, indent=2))
    return {"params": best["params"], OBJECTIVE: best[OBJECTIVE], "trials": len(best["trials"]), "dev_queries": len(data["dev"].queries)}
