#!/usr/bin/env bash
# custody-proxy under faults, with real clients (python's ssl, openssl s_client, curl):
# - the worker never blocks: with the key service holding every signature back, an open
#   connection on the same single worker keeps relaying while many handshakes wait at once;
# - custody-keyd killed: established connections relay byte for byte, new handshakes fail with
#   a TLS alert (no hang), and succeed again once keyd is back, without restarting the proxy;
# - bad input (garbage, plain HTTP, a cut-short ClientHello, a slowloris, a silent client) and
#   a backend that refuses or resets: that connection ends and is logged, nothing else suffers;
# - idle connections give their relay buffers back; bytes waiting in a buffer are never dropped.
# - busy transfers take turns (one buffer each with a short relay turn): every byte comes back,
#   and a newcomer's handshake and round trips are answered while they all still run.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
CLIENT="$E2E_LIB_DIR/proxy_client.py"

e2e_init
e2e_lab
# Held signatures wait up to 30 s in keyd (its deadline is the smaller of both sides').
sed -i 's/sign_timeout_ms: 2000/sign_timeout_ms: 30000/' "$CUSTODY_KEYD_CONFIG"
e2e_start_keyd
e2e_start_backend echo
export CUSTODY_PROXY_METRICS_ADDR

# proxy_config OUT SIGN_TIMEOUT_MS HANDSHAKE_TIMEOUT_MS: the lab's config with one worker.
proxy_config() {
  { echo "workers: 1"; sed -e "s/sign_timeout_ms: 2000/sign_timeout_ms: $2/" \
    -e "s/handshake_timeout_ms: 10000/handshake_timeout_ms: $3/" "$CUSTODY_PROXY_CONFIG"; } >"$1"
}

# ---------------------------------------------------------------- the worker never blocks
proxy_config "$E2E_TMP/held.yaml" 30000 30000
e2e_start_proxy "$E2E_TMP/held.yaml"
pass "custody-proxy up with one worker"
run_capture python3 "$CLIENT" relay-while-held "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" "$CTL" 24
[[ $E2E_RC -eq 0 ]] || { _e2e_show_output; fail "relay-while-held"; }
while read -r line; do pass "${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
check "no handshake failed meanwhile" test "$(proxy_metric \
  'custody_proxy_handshakes_total{listener="lab",outcome="failed"}')" -eq 0
e2e_stop_proxy TERM
check "proxy drained and exited 0" test "$PROXY_RC" -eq 0

# ---------------------------------------------------------------- admission control
sed 's/^limits:/limits:\n  max_handshakes: 4/' "$E2E_TMP/held.yaml" >"$E2E_TMP/admission.yaml"
e2e_start_proxy "$E2E_TMP/admission.yaml"
run_capture python3 "$CLIENT" admission "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" "$CTL" 12 4
[[ $E2E_RC -eq 0 ]] || { _e2e_show_output; fail "admission"; }
while read -r line; do pass "${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
e2e_stop_proxy TERM

# ---------------------------------------------------------------- keyd killed and restarted
proxy_config "$E2E_TMP/short.yaml" 2000 1500
e2e_start_proxy "$E2E_TMP/short.yaml"
e2e_kill_keyd_under_proxy
check "keyd down: the proxy logged the failed handshake" grep -q "handshake failed" "$E2E_TMP/proxy.log"
check "the log line names the client's address" \
  grep -qE '\[C[0-9]+ 127\.0\.0\.1:[0-9]+\] lab: handshake failed' "$E2E_TMP/proxy.log"
check "keyd down: the failed signature is counted" test "$(curl -sf \
  "http://$CUSTODY_PROXY_METRICS_ADDR/metrics" | grep -c '^custody_proxy_sign_errors_total')" -ge 1

e2e_start_keyd
ok_after=
for ((i = 0; i < 100; i++)); do
  if echo | timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
    -servername ec256.lab.test -verify_return_error 2>/dev/null | grep -q "Verify return code: 0"; then
    ok_after=$i
    break
  fi
  sleep 0.1
done
check "keyd back: handshakes succeed again without restarting the proxy" test -n "$ok_after"
check "keyd back: the proxy is the same process" kill -0 "$PROXY_PID"

# ---------------------------------------------------------------- bad input
for kind in garbage http partial slowloris silent; do
  run_capture python3 "$CLIENT" bad-input "$CUSTODY_PROXY_ADDR" "$kind"
  [[ $E2E_RC -eq 0 ]] || { _e2e_show_output; fail "bad input: $kind"; }
  pass "$(sed 's/^ok: //' "$E2E_OUT")"
done
check "bad input: garbage and HTTP logged as failed handshakes" \
  test "$(grep -c 'handshake failed' "$E2E_TMP/proxy.log")" -ge 3
check "bad input: cut-short, slowloris and silent clients logged as timed out" \
  test "$(grep -c 'handshake timed out' "$E2E_TMP/proxy.log")" -ge 3
run_capture python3 "$CLIENT" relay "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
check "bad input: a good client still relays afterwards" test "$E2E_RC" -eq 0

# ---------------------------------------------------------------- half-close, truncation
run_capture python3 "$CLIENT" half-close "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
while read -r line; do pass "${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
check "half-close: the client saw both" test "$(grep -c '^ok:' "$E2E_OUT")" -eq 2
# The FIN comes in with the last bytes: the proxy must see it now, not at its idle timeout (60 s;
# the client gives up after 30 s).
run_capture python3 "$CLIENT" truncate "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
check "truncation: the proxy ended the connection at the client's FIN" grep -q '^ok: truncation' \
  "$E2E_OUT"

# ---------------------------------------------------------------- idle connections' buffers
# 16384: limits.buffer_bytes's default (the lab's config leaves it).
run_capture python3 "$CLIENT" idle-buffers "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" 20 16384
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
while read -r line; do pass "idle buffers: ${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
check "idle buffers: every check passed" test "$E2E_RC" -eq 0

# ---------------------------------------------------------------- idle timeout (after a reload)
sed -i 's/idle_timeout_ms: 60000/idle_timeout_ms: 1000/' "$E2E_TMP/short.yaml"
kill -HUP "$PROXY_PID"
for ((i = 0; i < 200; i++)); do
  [[ "$(proxy_metric 'custody_proxy_config_reloads_total{outcome="ok"}')" -ge 1 ]] && break
  sleep 0.05
done
run_capture python3 "$CLIENT" idle "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
check "idle timeout: the proxy closed a silent connection" test "$E2E_RC" -eq 0
check "idle timeout: logged" grep -q "closed: idle for 1000 ms" "$E2E_TMP/proxy.log"

# ---------------------------------------------------------------- relay turns (after a reload)
# One buffer per turn: every turn that moves bytes ends at the limit and the connection goes on
# after the others; the echo must still come back whole, and the turns ended early be counted
# (with the default 2 MiB turn this transfer ends none early).
sed -i -e 's/idle_timeout_ms: 1000/idle_timeout_ms: 60000/' \
  -e 's/^limits:/limits:\n  relay_turn_bytes: 4096/' "$E2E_TMP/short.yaml"
kill -HUP "$PROXY_PID"
for ((i = 0; i < 200; i++)); do
  [[ "$(proxy_metric 'custody_proxy_config_reloads_total{outcome="ok"}')" -ge 2 ]] && break
  sleep 0.05
done
check "relay turns: the reload was taken" \
  test "$(proxy_metric 'custody_proxy_config_reloads_total{outcome="ok"}')" -ge 2
yielded_before=$(proxy_metric custody_proxy_relay_turns_yielded_total)
run_capture python3 "$CLIENT" half-close "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
check "relay turns of one buffer: 200000 bytes echoed back whole" \
  grep -q '^ok: half-close: 200000 bytes' "$E2E_OUT"
yielded=$(($(proxy_metric custody_proxy_relay_turns_yielded_total) - yielded_before))
check "relay turns of one buffer: $yielded turns ended at the limit (at least 12)" \
  test "$yielded" -ge 12
# Several busy at once: they take turns in the queue, each byte comes back, and a newcomer's
# handshake and round trips are answered while they all still run.
yielded_before=$(proxy_metric custody_proxy_relay_turns_yielded_total)
run_capture python3 "$CLIENT" busy-relays "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" 4 8388608
[[ $E2E_RC -eq 0 ]] || _e2e_show_output
while read -r line; do pass "relay turns of one buffer: ${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
check "relay turns of one buffer: busy-relays passed every check" test "$E2E_RC" -eq 0
yielded=$(($(proxy_metric custody_proxy_relay_turns_yielded_total) - yielded_before))
# 4 x 8 MiB each way in turns of at most 16 KiB each way: at least 2048 turns, most of them
# ended at the limit.
check "relay turns of one buffer: $yielded busy turns ended at the limit (at least 1024)" \
  test "$yielded" -ge 1024

# ---------------------------------------------------------------- backend refuses, resets
e2e_stop_backend
run_capture timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
  -servername ec256.lab.test -ign_eof </dev/null
check "backend refuses: the client connection ends (no hang)" test "$E2E_RC" -ne 124
check "backend refuses: logged with the reason" grep -q "backend 127.0.0.1:.*Connection refused" \
  "$E2E_TMP/proxy.log"
python3 - "$CUSTODY_BACKEND_ADDR" >"$E2E_TMP/rst.log" 2>&1 <<'PY' &
import socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen()
print("listening", flush=True)
while True:  # Every connection (the readiness probe's too) is reset.
    c, _ = s.accept()
    c.settimeout(5)
    try:
        c.recv(100)
    except OSError:
        pass
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
PY
RST_PID=$!
wait_tcp "$CUSTODY_BACKEND_ADDR" 10 || fail "RST backend did not listen"
run_capture bash -c "printf 'hello\n' | timeout 20 openssl s_client -connect '$CUSTODY_PROXY_ADDR' \
  -CAfile '$CUSTODY_CA' -servername ec256.lab.test -ign_eof"
check "backend resets: the client connection ends (no hang)" test "$E2E_RC" -ne 124
kill "$RST_PID" 2>/dev/null || true
wait "$RST_PID" 2>/dev/null || true
check "backend resets: logged with the reason" grep -q "backend: Connection reset by peer" \
  "$E2E_TMP/proxy.log"
e2e_start_backend echo
run_capture python3 "$CLIENT" relay "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA"
check "backend back: relaying works again" test "$E2E_RC" -eq 0
check "the proxy never crashed" kill -0 "$PROXY_PID"

e2e_finish
