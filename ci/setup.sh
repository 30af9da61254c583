#!/usr/bin/env bash
# ci/setup.sh: install every Debian package custody needs to build, test, run the lab and
# benchmark. Idempotent: installs only what is missing; runs apt-get update only when needed.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config
  # libraries
  libssl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc grpc-proto
  libabsl-dev libyaml-cpp-dev libspdlog-dev libfmt-dev prometheus-cpp-dev libcli11-dev
  libp11-dev libp11-kit-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev
  # the lab: SoftHSM2, OpenSC's pkcs11-tool, libp11's OpenSSL engine, and clients
  softhsm2 opensc libengine-pkcs11-openssl openssl curl python3 procps strace
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "ci/setup.sh: all ${#PACKAGES[@]} packages present" >&2
  exit 0
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
echo "ci/setup.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Lists may be absent (fresh image) or stale: update first, then install.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "ci/setup.sh: done" >&2
