#!/usr/bin/env bash
# ci/build.sh [BUILD_DIR] [cmake args...]: configure and build custody (default build/).
# CUSTODY_JOBS sets the parallelism (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
shift || true
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-RelWithDebInfo}" "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "${CUSTODY_JOBS:-$(nproc)}"
