#!/usr/bin/env bash
# torch's TestOptimRenewed against ShardedRMSprop (see conftest.py). Needs, next to this file:
#   test_optim.py  pytorch's test/test_optim.py of the installed torch's version, with its
#                  imports from test/optim/ (TestLRScheduler, TestDifferentiableOptimizer,
#                  TestSWAUtils) and the instantiate_device_type_tests(TestSWAUtils) line removed
#                  (the wheel does not ship that folder)
#   deps/          pip install --target deps expecttest
# Usage, from the repository root: bash benchmarks/torch_optim_suite/run.sh nogroup|group1
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$(dirname "$0")"
export SHARDED_MODE="${1:-nogroup}" OMP_NUM_THREADS=1 PYTHONPATH="$ROOT"
shift || true
exec "$ROOT/.venv/bin/python" -m pytest test_optim.py -p no:cacheprovider -rf --tb=short \
    -k "TestOptimRenewed and cpu and (RMSprop or rmsprop)" "$@"
