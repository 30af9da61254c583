#!/usr/bin/env bash
# The proxy's key client with several key-service replicas (two custody-keyd processes on the
# same token): signatures are spread over both, and when one is killed handshakes go on through
# the other, without restarting the proxy.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

e2e_setup
e2e_start_backend http

# A second replica: same token and policy, its own port, metrics port and audit log.
read -r PORT2 MPORT2 < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')
KEYD2_ADDR="127.0.0.1:$PORT2"
sed -e "s/^listen: .*/listen: \"$KEYD2_ADDR\"/" \
  -e "s#^  path: .*audit.log\"#  path: \"$E2E_TMP/audit2.log\"#" \
  -e "s#^  path: .*keyd.sock\"#  path: \"$E2E_TMP/keyd2.sock\"#" \
  -e "s/^  listen: \"127.0.0.1:[0-9]*\"/  listen: \"127.0.0.1:$MPORT2\"/" \
  "$CUSTODY_KEYD_CONFIG" >"$E2E_TMP/keyd2.yaml"
"$KEYD" --config "$E2E_TMP/keyd2.yaml" >"$E2E_TMP/keyd2.log" 2>&1 </dev/null &
KEYD2_PID=$!
trap 'kill -9 $KEYD2_PID 2>/dev/null || true; _e2e_on_exit' EXIT
for ((i = 0; i < 200; i++)); do
  "$CTL" --addr "$KEYD2_ADDR" --timeout-ms 1000 health >/dev/null 2>&1 && break
  sleep 0.1
done
check "second replica SERVING on $KEYD2_ADDR" "$CTL" --addr "$KEYD2_ADDR" health

sed "s/addresses: \[\"\(127.0.0.1:[0-9]*\)\"\]/addresses: [\"\1\", \"$KEYD2_ADDR\"]/" \
  "$CUSTODY_PROXY_CONFIG" >"$E2E_TMP/proxy.yaml"
check "proxy config lists both replicas" grep -q "addresses: \[\"$CUSTODY_KEYD_ADDR\", \"$KEYD2_ADDR\"\]" \
  "$E2E_TMP/proxy.yaml"
e2e_start_proxy "$E2E_TMP/proxy.yaml"
PORT=${CUSTODY_PROXY_ADDR##*:}

handshakes() { # N: N sequential handshakes+requests; prints how many succeeded
  local n=$1 good=0 i
  for ((i = 0; i < n; i++)); do
    curl -sf -o /dev/null --cacert "$CUSTODY_CA" --resolve "ec256.lab.test:$PORT:127.0.0.1" \
      "https://ec256.lab.test:$PORT/failover-$i" && good=$((good + 1))
  done
  echo "$good"
}
signed_by() { grep -c '"caller":"proxy"' "$1" 2>/dev/null || echo 0; }

check "40 handshakes with both replicas up" test "$(handshakes 40)" -eq 40
a1=$(signed_by "$CUSTODY_AUDIT_LOG")
a2=$(signed_by "$E2E_TMP/audit2.log")
check "signatures spread over both replicas ($a1 + $a2)" test "$a1" -ge 1 -a "$a2" -ge 1

e2e_stop_keyd KILL
pass "replica 1 killed (SIGKILL)"
got=$(handshakes 40)
# A handshake whose signature was in flight on the killed replica may fail; later ones may not.
check "after the kill: $got of 40 handshakes succeeded (at most one lost)" test "$got" -ge 39
b2=$(signed_by "$E2E_TMP/audit2.log")
check "the surviving replica signed them ($((b2 - a2)) more)" test $((b2 - a2)) -ge "$got"
check "the proxy is the same process" kill -0 "$PROXY_PID"

e2e_start_keyd
check "replica 1 back: handshakes go on" test "$(handshakes 20)" -eq 20
kill -TERM "$KEYD2_PID"
wait "$KEYD2_PID" 2>/dev/null || true
check "replica 2 stopped: handshakes go on through replica 1" test "$(handshakes 20)" -ge 19
e2e_finish
