#!/usr/bin/env bash
# ci/demo.sh: the lab demo from a fresh clone. Installs what is missing, builds, makes a SoftHSM2
# lab in ./lab (keys generated inside the token), starts custody-keyd, the lab backend and
# custody-proxy, and sends HTTPS requests through the proxy with curl: every handshake signature
# is made in the HSM, behind the key service, and recorded in the audit log.
#
#   ci/demo.sh [--keep-running] [--lab DIR]
#
# --keep-running leaves custody-keyd, custody-proxy and the backend running (stop them with:
# kill $(cat DIR/*.pid)).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LAB=$ROOT/lab
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-running) KEEP=1; shift ;;
    --lab) LAB=$(realpath -m "$2"); shift 2 ;;
    *) echo "usage: ci/demo.sh [--keep-running] [--lab DIR]" >&2; exit 2 ;;
  esac
done
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what is missing, building"
ci/setup.sh
ci/build.sh build
BIN=$ROOT/build/bin

say "making the SoftHSM2 lab in $LAB"
for pidfile in "$LAB"/proxy.pid "$LAB"/backend.pid "$LAB"/keyd.pid; do
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -TERM "$(cat "$pidfile")"
    while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 0.1; done
  fi
done
hsm/lab.sh init "$LAB" --force >/dev/null
# shellcheck disable=SC1091
source "$LAB/lab.env"

say "starting custody-keyd on $CUSTODY_KEYD_ADDR (metrics on $CUSTODY_KEYD_METRICS_ADDR)"
"$BIN/custody-keyd" --config "$CUSTODY_KEYD_CONFIG" >"$LAB/keyd.log" 2>&1 &
echo $! >"$LAB/keyd.pid"
stop_all() {
  [ "$KEEP" = 0 ] || return 0
  for name in proxy backend keyd; do
    if [ -f "$LAB/$name.pid" ] && kill -0 "$(cat "$LAB/$name.pid")" 2>/dev/null; then
      kill -TERM "$(cat "$LAB/$name.pid")"
      wait "$(cat "$LAB/$name.pid")" 2>/dev/null || true
    fi
  done
}
trap stop_all EXIT
for _ in $(seq 1 200); do
  "$BIN/custodyctl" health >/dev/null 2>&1 && break
  sleep 0.05
done
"$BIN/custodyctl" health

say "keys in the token (as the proxy identity sees them)"
"$BIN/custodyctl" --identity proxy keys list

say "signing a message with lab-ec256 inside the HSM"
MSG=$LAB/demo-message.txt
echo "custody demo $(date -u +%FT%TZ)" >"$MSG"
"$BIN/custodyctl" --identity proxy sign --key lab-ec256 --scheme ecdsa_secp256r1_sha256 \
  --in "$MSG" --out "$LAB/demo-message.sig"

say "verifying it with OpenSSL against the certificate's public key"
openssl x509 -in "$LAB/certs/lab-ec256.crt" -pubkey -noout >"$LAB/demo-pub.pem"
openssl dgst -sha256 -verify "$LAB/demo-pub.pem" -signature "$LAB/demo-message.sig" "$MSG"

say "an identity without rights is refused (and audited)"
"$BIN/custodyctl" --identity intruder sign --key lab-ec256 --scheme ecdsa_secp256r1_sha256 \
  --in "$MSG" --out /dev/null || true

say "the audit log ($CUSTODY_AUDIT_LOG)"
tail -n 2 "$CUSTODY_AUDIT_LOG"
"$BIN/custodyctl" audit verify "$CUSTODY_AUDIT_LOG"

say "metrics"
curl -s "http://$CUSTODY_KEYD_METRICS_ADDR/metrics" | grep '^custody_keyd_signatures_total'

say "a stock TLS server whose handshake key stays in the HSM (openssl s_server + custody provider)"
export OPENSSL_MODULES=$ROOT/build/lib
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
timeout 20 openssl s_server -provider default -provider custody -accept "127.0.0.1:$PORT" \
  -key custody:key=lab-ec256 -cert "$LAB/certs/lab-ec256.crt" -naccept 1 -www \
  >"$LAB/s_server.log" 2>&1 </dev/null &
SERVER_PID=$!
for _ in $(seq 1 100); do grep -q '^ACCEPT' "$LAB/s_server.log" 2>/dev/null && break; sleep 0.05; done
echo | openssl s_client -connect "127.0.0.1:$PORT" -CAfile "$CUSTODY_CA" -servername localhost \
  2>/dev/null | grep -E '^(New|Peer signature type|Verify return code)'
wait "$SERVER_PID" || true
tail -n 1 "$CUSTODY_AUDIT_LOG"

say "the TLS proxy: custody-proxy on $CUSTODY_PROXY_ADDR, the lab backend on $CUSTODY_BACKEND_ADDR"
"$BIN/custody-lab-backend" --listen "$CUSTODY_BACKEND_ADDR" >"$LAB/backend.log" 2>&1 &
echo $! >"$LAB/backend.pid"
"$BIN/custody-proxy" --config "$CUSTODY_PROXY_CONFIG" >"$LAB/proxy.log" 2>&1 &
echo $! >"$LAB/proxy.pid"
for _ in $(seq 1 200); do
  curl -sf -o /dev/null "http://$CUSTODY_PROXY_METRICS_ADDR/metrics" && break
  sleep 0.05
done
grep -E "serves|ready" "$LAB/proxy.log" | sed 's/^[^ ]* //'
PORT=${CUSTODY_PROXY_ADDR##*:}
for name in ec256 ec384 rsa2048 ed25519; do
  say "curl https://$name.lab.test:$PORT/ through the proxy (key lab-$name, signed in the HSM)"
  curl -sS --cacert "$CUSTODY_CA" --resolve "$name.lab.test:$PORT:127.0.0.1" \
    -w '(%{http_version}, certificate verified: %{ssl_verify_result} = ok)\n' \
    "https://$name.lab.test:$PORT/hello"
  tail -n 1 "$CUSTODY_AUDIT_LOG" | grep -o '"caller":"proxy".*"outcome":"OK"'
done
"$BIN/custodyctl" audit verify "$CUSTODY_AUDIT_LOG"

say "proxy metrics"
curl -s "http://$CUSTODY_PROXY_METRICS_ADDR/metrics" |
  grep -E '^custody_proxy_(handshakes_total|bytes_total|sign_duration_seconds_count)' | grep -v ' 0$'

if [ "$KEEP" = 1 ]; then
  say "still running: custody-keyd, custody-proxy on $CUSTODY_PROXY_ADDR and the backend (kill \$(cat $LAB/*.pid)); try: curl --cacert $CUSTODY_CA --resolve ec256.lab.test:$PORT:127.0.0.1 https://ec256.lab.test:$PORT/"
else
  say "done; run with --keep-running to leave everything up"
fi
