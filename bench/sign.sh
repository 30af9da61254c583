#!/usr/bin/env bash
# bench/sign.sh: signatures per second through custody-keyd (gRPC, mutual TLS) against direct
# C_Sign on the same SoftHSM2 token, in one run, at concurrency 1, 16 and 64, for ECDSA P-256
# and RSA-2048; prints each run and the keyd/direct ratios with p50/p99 latency. Two client
# styles: one unary Sign call per signature ("keyd"), and BatchingSigner ("batched": natural
# batching over SignBatch, two calls in flight), which is how a busy proxy signs.
#
#   bench/sign.sh [--seconds N] [--build DIR]
#
# Both sides share this machine (2 cores): the client, keyd and SoftHSM compete for the same
# CPUs, so read the ratios, not the absolute rates. Loopback only; bounded by --seconds per run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$ROOT/build
SECONDS_PER_RUN=3
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    *) echo "usage: bench/sign.sh [--seconds N] [--build DIR]" >&2; exit 2 ;;
  esac
done
BIN=$BUILD/bin
for b in custody-keyd custody-bench-sign custodyctl; do
  [ -x "$BIN/$b" ] || { echo "bench/sign.sh: $BIN/$b missing; run ci/build.sh first" >&2; exit 2; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/custody-bench-XXXXXX")
KEYD_PID=
cleanup() {
  if [ -n "$KEYD_PID" ] && kill -0 "$KEYD_PID" 2>/dev/null; then
    kill -TERM "$KEYD_PID" 2>/dev/null || true
    wait "$KEYD_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

"$ROOT/hsm/lab.sh" init "$TMP/lab" >/dev/null 2>&1
# shellcheck disable=SC1091
source "$TMP/lab/lab.env"
# The pool is the HSM's concurrency: as many sessions as the largest client concurrency.
sed -i 's/^  sessions: .*/  sessions: 64/' "$CUSTODY_KEYD_CONFIG"
"$BIN/custody-keyd" --config "$CUSTODY_KEYD_CONFIG" --log-level warn >"$TMP/keyd.log" 2>&1 &
KEYD_PID=$!
for _ in $(seq 1 200); do
  "$BIN/custodyctl" --identity proxy health >/dev/null 2>&1 && break
  sleep 0.05
done
"$BIN/custodyctl" --identity proxy health >/dev/null

run() { # run MODE KEY SCHEME CONCURRENCY [extra flags]
  local mode=$1 key=$2 scheme=$3 conc=$4
  shift 4
  "$BIN/custody-bench-sign" --mode "$mode" --key "$key" --scheme "$scheme" --concurrency "$conc" \
    --seconds "$SECONDS_PER_RUN" "$@"
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

printf '%-8s %-16s %4s %9s %9s %6s %9s %6s %8s %8s %8s %8s %8s %8s\n' key scheme conc \
  direct/s keyd/s ratio batched/s ratio d_p50us d_p99us k_p50us k_p99us b_p50us b_p99us
for spec in "lab-ec256 ecdsa_secp256r1_sha256" "lab-rsa2048 rsa_pkcs1_sha256"; do
  set -- $spec
  key=$1 scheme=$2
  for c in 1 16 64; do
    d=$(run direct "$key" "$scheme" "$c")
    k=$(run keyd "$key" "$scheme" "$c")
    b=$(run keyd "$key" "$scheme" "$c" --batch-in-flight 2)
    printf '%s\n%s\n%s (batched)\n' "$d" "$k" "$b" >>"$TMP/raw.txt"
    dr=$(field ops_per_s "$d") kr=$(field ops_per_s "$k") br=$(field ops_per_s "$b")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
    printf '%-8s %-16s %4s %9s %9s %6s %9s %6s %8s %8s %8s %8s %8s %8s\n' "${key#lab-}" \
      "${scheme%_sha*}" "$c" "$dr" "$kr" "$(ratio "$kr" "$dr")" "$br" "$(ratio "$br" "$dr")" \
      "$(field p50_us "$d")" "$(field p99_us "$d")" "$(field p50_us "$k")" \
      "$(field p99_us "$k")" "$(field p50_us "$b")" "$(field p99_us "$b")"
    for line in "$d" "$k" "$b"; do
      errors=$(field errors "$line")
      [ "${errors:-0}" = 0 ] || echo "WARNING: $errors errors in: $line" >&2
    done
  done
done
echo
echo "raw runs:"
cat "$TMP/raw.txt"
