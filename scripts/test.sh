#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole pytest suite on pytest-xdist workers, one test file
# per worker at a time (each worker's Ray instance, Serve ports and cache are its own; tests/conftest.py starts
# the slowest files first). MR_RAY_TEST_WORKERS=1 runs it in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
WORKERS="${MR_RAY_TEST_WORKERS:-2}"
# Arguments (test files, -k, ...) go to pytest as given; none means the whole suite.
(( $# )) || set -- tests
if [[ "$WORKERS" == 1 ]]; then
  exec "$ROOT/.venv/bin/python" -m pytest "$@"
fi
exec "$ROOT/.venv/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
