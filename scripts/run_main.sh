#!/usr/bin/env bash
# The main job: set up, start a local Ray cluster, `ray job submit` the whole
# pipeline on the embedded sample catalog, print the evaluation report.
# Env: MR_RAY_CONFIG (default jobs/configs/sample.yaml), MR_RAY_RUN_DIR
# (default runs/sample), MR_RAY_KEEP_CLUSTER=1 to leave the cluster running
# (for `mr-ray serve` afterwards), MR_RAY_GCS_PORT / MR_RAY_DASHBOARD_PORT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/.venv/bin/activate"
CONFIG="$(realpath "${MR_RAY_CONFIG:-$ROOT/jobs/configs/sample.yaml}")"
RUN_DIR="$(realpath -m "${MR_RAY_RUN_DIR:-$ROOT/runs/sample}")"
DASHBOARD_PORT="${MR_RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${MR_RAY_GCS_PORT:-6379}"
# Ray's dashboard agent listens on 52365 by default; with another Ray instance on the host holding it, this
# head would never accept a job. A free port instead, unless MR_RAY_AGENT_PORT names one.
free_port() { python -c 'from mr_ray.serve.ports import free_port; print(free_port())'; }  # below the ephemeral range
port_taken() { ! python -c 'import sys; from mr_ray.serve.ports import port_is_free; sys.exit(not port_is_free(int(sys.argv[1])))' "$1"; }
AGENT_PORT="${MR_RAY_AGENT_PORT:-$(free_port)}"
export RAY_AUTH_MODE=disabled  # a local, loopback-only cluster
export RAY_USAGE_STATS_ENABLED=0
# Serve's environment (mr_ray/cluster.py) for the head, so `mr-ray serve` on a kept cluster serves as on its own.
eval "$(python -c 'from mr_ray.cluster import SERVE_ENVIRONMENT as env; print(" ".join(f"export {k}={v};" for k, v in env.items()))')"

mkdir -p "$(dirname "$RUN_DIR")"
HEAD_PID=""
if ! ray status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; then
  # Another Ray instance on the host (an `mr-ray run`'s private cluster) may hold the dashboard port: the wait
  # below would take its dashboard for ours and submit the job there. A free port instead, unless one was named.
  if port_taken "$DASHBOARD_PORT"; then
    if [[ -n "${MR_RAY_DASHBOARD_PORT:-}" ]]; then
      echo "error: MR_RAY_DASHBOARD_PORT $DASHBOARD_PORT is in use by another process; name a free port" >&2; exit 2
    fi
    echo "[mr-ray] port $DASHBOARD_PORT is in use by another process: this cluster's dashboard takes a free port"
    DASHBOARD_PORT="$(free_port)"
  fi
  # Started from the venv, so the job's python is the venv's. --block keeps
  # the head in this script's hands: stopping it stops only this cluster.
  ray start --head --block --num-cpus "${MR_RAY_NUM_CPUS:-2}" --port "$GCS_PORT" --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" --disable-usage-stats >"$RUN_DIR.ray-head.log" 2>&1 &
  HEAD_PID=$!
  for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null 2>&1 && break
    kill -0 "$HEAD_PID" 2>/dev/null || { cat "$RUN_DIR.ray-head.log"; exit 1; }
    sleep 1
  done
fi
stop_cluster() {
  if [[ -n "$HEAD_PID" && "${MR_RAY_KEEP_CLUSTER:-0}" != 1 ]]; then
    kill -TERM "$HEAD_PID" 2>/dev/null || true
    wait "$HEAD_PID" 2>/dev/null || true
  fi
}
trap stop_cluster EXIT

ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
JOB_ID="mr-ray-$(date +%Y%m%d-%H%M%S)-$$"
# A fresh head serves HTTP a little before its job agent is up: retry the submit alone.
SUBMITTED=""
for attempt in $(seq 60); do
  if ray job submit --address "$ADDRESS" --submission-id "$JOB_ID" --no-wait -- \
      python "$ROOT/jobs/run_pipeline.py" --config "$CONFIG" --run-dir "$RUN_DIR" >"$RUN_DIR.submit.log" 2>&1; then
    SUBMITTED=1
    break
  fi
  grep -q "No available agent" "$RUN_DIR.submit.log" || { cat "$RUN_DIR.submit.log"; exit 1; }
  sleep 2
done
[[ -n "$SUBMITTED" ]] || { echo "[mr-ray] the Ray head at $ADDRESS never accepted the job (no job agent after 60 tries; its logs/dashboard_agent.log says why)" >&2; exit 1; }
echo "[mr-ray] submitted job $JOB_ID to $ADDRESS"
ray job logs --address "$ADDRESS" --follow "$JOB_ID" || true
# `ray job status` prints "Job '<id>' succeeded|failed|was stopped" once the job
# is over, "Status for job ..." while it still runs.
for _ in $(seq 360); do
  STATUS="$(ray job status --address "$ADDRESS" "$JOB_ID" 2>&1 || true)"
  [[ "$STATUS" == *"Status for job"* ]] || break
  sleep 5
done
if [[ "$STATUS" != *"Job '$JOB_ID' succeeded"* ]]; then
  echo "[mr-ray] job $JOB_ID did not succeed:"; echo "$STATUS"; exit 1
fi
echo "[mr-ray] job $JOB_ID SUCCEEDED"
echo "[mr-ray] report: $RUN_DIR/evaluate/report.md"
