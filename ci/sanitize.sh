#!/usr/bin/env bash
# ci/sanitize.sh [asan|tsan]: build with AddressSanitizer+UBSan (default) or ThreadSanitizer in
# build-asan/ or build-tsan/, and run the test suite there.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-asan}
ci/setup.sh
case "$kind" in
  asan) ci/build.sh build-asan -DCUSTODY_SANITIZE=ON -DCUSTODY_BUILD_BENCH=OFF ;;
  tsan) ci/build.sh build-tsan -DCUSTODY_TSAN=ON -DCUSTODY_BUILD_BENCH=OFF ;;
  *) echo "usage: ci/sanitize.sh [asan|tsan]" >&2; exit 2 ;;
esac
# Every process the tests start (custody-keyd included) inherits these.
export LSAN_OPTIONS="suppressions=$(pwd)/ci/lsan.supp:print_suppressions=0"
# Slow unwinding: leak stacks must reach through libcrypto (no frame pointers) to the module
# that allocated, for the suppressions to match.
export ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0"
# Stock programs that load our sanitized provider module need the runtime preloaded.
if [ "$kind" = asan ]; then
  CUSTODY_ASAN_PRELOAD=$(gcc -print-file-name=libasan.so)
  export CUSTODY_ASAN_PRELOAD
fi
export TSAN_OPTIONS="suppressions=$(pwd)/ci/tsan.supp:second_deadlock_stack=1"
cd "build-$kind"
ctest --output-on-failure --timeout 900 -j 2
