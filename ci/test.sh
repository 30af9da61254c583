#!/usr/bin/env bash
# ci/test.sh: the whole test suite from a fresh clone: install what is missing, build, run every
# test (unit, integration, e2e) with ctest. Exit status is ctest's.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh
ci/build.sh build
cd build
ctest --output-on-failure --timeout 600 -j "${CUSTODY_TEST_JOBS:-2}" "$@"
