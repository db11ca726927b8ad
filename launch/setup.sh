#!/usr/bin/env bash
# Make ./.venv with torch (the CPU build), this package, its test tools, mpi4py with MPICH
# (so mpirun works without a system MPI), triton (its interpreter tests the CUDA kernel on
# CPU), matplotlib (plots), and transformers, accelerate, lightning and safetensors (the
# frameworks the integration tests train inside). Idempotent: a second run only checks that
# everything is there. Needs python3 with pip and venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build first, pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e ".[test,mpi,plot,integrations]"
