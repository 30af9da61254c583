#!/usr/bin/env bash
# custody-proxy's life cycle with real clients:
# - SIGHUP reloads: new certificates for new handshakes, open connections untouched; a bad
#   config (a typo, a changed listen address, a key the key service lacks) is refused, named in
#   the log, and the running config stays;
# - SIGTERM drains: no new connections, open ones finish, then exit 0; connections still open
#   at the drain timeout are closed;
# - both servers run with glibc's larger per-thread malloc cache (they re-execute themselves).
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
CLIENT="$E2E_LIB_DIR/proxy_client.py"

unset GLIBC_TUNABLES  # What the servers set themselves is checked below.
e2e_setup
e2e_start_backend http
CONFIG="$E2E_TMP/proxy.yaml"
cp -- "$CUSTODY_PROXY_CONFIG" "$CONFIG"
e2e_start_proxy "$CONFIG"
pass "custody-proxy up"

# tunables PID: the GLIBC_TUNABLES a process runs with.
tunables() { tr '\0' '\n' <"/proc/$1/environ" | sed -n 's/^GLIBC_TUNABLES=//p'; }
check "keyd re-executed itself with glibc.malloc.tcache_count=128 (same pid)" \
  test "$(tunables "$KEYD_PID")" = glibc.malloc.tcache_count=128
check "the proxy re-executed itself with glibc.malloc.tcache_count=128 (same pid)" \
  test "$(tunables "$PROXY_PID")" = glibc.malloc.tcache_count=128

default_cn() {
  echo | timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
    -noservername 2>/dev/null | sed -n 's/^subject=.*CN = //p'
}
reloads() { proxy_metric "custody_proxy_config_reloads_total{outcome=\"$1\"}"; }
# wait_reloads OUTCOME N: poll the metrics until N reloads with OUTCOME were counted.
wait_reloads() {
  local i
  for ((i = 0; i < 200; i++)); do
    [[ "$(reloads "$1")" -ge "$2" ]] && return 0
    sleep 0.05
  done
  return 1
}
# ask PATH: one request on the held connection; prints the status line and body.
ask() {
  echo "$1" >&"${HOLD[1]}"
  local line
  read -r -t 20 line <&"${HOLD[0]}" || line="(no answer)"
  echo "$line"
}

coproc HOLD { python3 "$CLIENT" hold "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" ec256.lab.test 2>&1; }
read -r -t 30 line <&"${HOLD[0]}" || fail "held client did not connect"
check "held connection open" test "$line" = open
check "held connection answers" grep -q "200 OK | hello from the custody lab backend: GET /before" <<<"$(ask /before)"
check "default certificate before reload: ec256" test "$(default_cn)" = ec256.lab.test

# ---------------------------------------------------------------- a good reload
python3 - "$CONFIG" <<'PY'
import sys
p = sys.argv[1]
t = open(p).read()
t = t.replace('        default: true\n', '')
t = t.replace('server_names: ["rsa2048.lab.test"]', 'server_names: ["rsa2048.lab.test"]\n        default: true')
open(p, "w").write(t)
PY
kill -HUP "$PROXY_PID"
check "SIGHUP: reload counted ok" wait_reloads ok 1
check "after reload: new handshakes get the new default (rsa2048)" test "$(default_cn)" = rsa2048.lab.test
check "after reload: the open connection is untouched" \
  grep -q "200 OK | hello from the custody lab backend: GET /after-reload" <<<"$(ask /after-reload)"

# ---------------------------------------------------------------- bad reloads
cp -- "$CONFIG" "$E2E_TMP/good.yaml"
bad_reload() { # N WHAT: after SIGHUP, the Nth refusal is counted and logged with WHAT
  kill -HUP "$PROXY_PID"
  wait_reloads refused "$1" && grep -q "reload refused.*$2" "$E2E_TMP/proxy.log"
}
sed 's/^listeners:/listners:/' "$E2E_TMP/good.yaml" >"$CONFIG"
check "reload with a misspelled field: refused, naming it" bad_reload 1 "listners"
sed "s/listen: \"127.0.0.1:[0-9]*\"/listen: \"127.0.0.1:1\"/" "$E2E_TMP/good.yaml" >"$CONFIG"
check "reload with a changed listen address: refused (restart needed)" bad_reload 2 "restart the proxy"
sed 's/key: "lab-ec384"/key: "lab-nope"/' "$E2E_TMP/good.yaml" >"$CONFIG"
check "reload naming a key the key service lacks: refused, naming it" bad_reload 3 "lab-nope"
# A chain from a file instead of the key service's: it must carry the key's public half.
sed "s#        server_names: \[\"ec384.lab.test\"\]#        server_names: [\"ec384.lab.test\"]\n        chain_file: \"$CUSTODY_LAB_DIR/certs/lab-ec256.crt\"#" \
  "$E2E_TMP/good.yaml" >"$CONFIG"
check "reload with a chain_file whose leaf is another key's: refused, naming the key" \
  bad_reload 4 "key 'lab-ec384'.*does not carry this key's public half"
sed "s#        server_names: \[\"ec384.lab.test\"\]#        server_names: [\"ec384.lab.test\"]\n        chain_file: \"$CUSTODY_LAB_DIR/certs/lab-ec384.crt\"#" \
  "$E2E_TMP/good.yaml" >"$CONFIG"
kill -HUP "$PROXY_PID"
check "reload with a matching chain_file: accepted" wait_reloads ok 2
check "the chain from the file is served" bash -c "echo | timeout 20 openssl s_client \
  -connect $CUSTODY_PROXY_ADDR -CAfile $CUSTODY_CA -servername ec384.lab.test 2>/dev/null |
  grep -q 'Verify return code: 0'"
cp -- "$E2E_TMP/good.yaml" "$CONFIG"
kill -HUP "$PROXY_PID"
check "reload back to chains from the key service" wait_reloads ok 3
check "after refused reloads: the running config stays (default rsa2048)" \
  test "$(default_cn)" = rsa2048.lab.test
check "after refused reloads: the open connection still answers" \
  grep -q "200 OK" <<<"$(ask /after-refusals)"
cp -- "$E2E_TMP/good.yaml" "$CONFIG"

# ---------------------------------------------------------------- drain
kill -TERM "$PROXY_PID"
refused=
for ((i = 0; i < 200; i++)); do
  if ! python3 -c 'import socket,sys; h,p=sys.argv[1].rsplit(":",1); socket.create_connection((h,int(p)),timeout=2).close()' \
    "$CUSTODY_PROXY_ADDR" 2>/dev/null; then
    refused=1
    break
  fi
  sleep 0.05
done
check "SIGTERM: new connections are refused" test -n "$refused"
check "SIGTERM: the open connection still answers while draining" \
  grep -q "200 OK | hello from the custody lab backend: GET /draining" <<<"$(ask /draining)"
check "SIGTERM: the proxy waits for it" kill -0 "$PROXY_PID"
exec {HOLD[1]}>&- # the client closes its connection
wait "$HOLD_PID" 2>/dev/null || true
for ((i = 0; i < 100; i++)); do
  kill -0 "$PROXY_PID" 2>/dev/null || break
  sleep 0.1
done
PROXY_RC=0
wait "$PROXY_PID" 2>/dev/null || PROXY_RC=$?
PROXY_PID=
check "SIGTERM: once the last connection closed, the proxy exited 0" test "$PROXY_RC" -eq 0

# ---------------------------------------------------------------- drain timeout
sed 's/drain_timeout_ms: 10000/drain_timeout_ms: 1000/' "$E2E_TMP/good.yaml" >"$CONFIG"
e2e_start_proxy "$CONFIG"
coproc HOLD { python3 "$CLIENT" hold "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" ec256.lab.test 2>&1; }
read -r -t 30 line <&"${HOLD[0]}" || fail "held client did not connect"
check "second held connection answers" grep -q "200 OK" <<<"$(ask /second)"
e2e_stop_proxy TERM 15
check "drain timeout: the proxy closed the idle connection and exited 0" test "$PROXY_RC" -eq 0
check "drain timeout: logged" grep -q "drain timeout: closing" "$E2E_TMP/proxy.log"
exec {HOLD[1]}>&-
wait "$HOLD_PID" 2>/dev/null || true

e2e_finish
