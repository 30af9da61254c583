#!/usr/bin/env bash
# custody-proxy signing over keyd's signing socket (key_service.signing_socket), with real
# processes and clients:
# - a handshake with every lab key and scheme, each signature audited as made on the signing
#   socket, by the proxy's uid;
# - the worker never blocks: with keyd holding every signature back, an open connection on the
#   same single worker keeps relaying while many handshakes wait at once;
# - keyd killed: established connections relay byte for byte, new handshakes fail with a TLS
#   alert (no hang), and once keyd is back they succeed, on the signing socket again, without
#   restarting the proxy;
# - keyd without a signing socket: the proxy signs over gRPC and says so; the socket back, the
#   proxy returns to it;
# - bad input on keyd's signing socket (no preface, a frame that is not a request, an oversized
#   frame, an empty request, a repeated id, a uid not allowed): that connection is closed,
#   logged and audited, and keyd goes on signing for the proxy.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
CLIENT="$E2E_LIB_DIR/proxy_client.py"

e2e_init
e2e_lab
if [[ -z "${CUSTODY_KEYD_SIGNING_SOCKET:-}" ]]; then
  pass "this lab has no keyd signing socket (its folder path is too long): nothing to check"
  e2e_finish
fi
# Held signatures wait up to 30 s in keyd (its deadline is the smaller of both sides').
sed -i 's/sign_timeout_ms: 2000/sign_timeout_ms: 30000/' "$CUSTODY_KEYD_CONFIG"
e2e_start_keyd
e2e_start_backend
export CUSTODY_PROXY_METRICS_ADDR
PORT=${CUSTODY_PROXY_ADDR##*:}
SOCK=$CUSTODY_KEYD_SIGNING_SOCKET
UID_NOW=$(id -u)

audit_count() { wc -l <"$CUSTODY_AUDIT_LOG"; }
on_socket() { grep -c "\"peer\":\"unix:$SOCK pid=[0-9]* uid=$UID_NOW\"" "$CUSTODY_AUDIT_LOG" || true; }
over_grpc() { grep -c "\"peer\":\"unix:${CUSTODY_KEYD_SOCKET#unix:} (fd:" "$CUSTODY_AUDIT_LOG" || true; }
# proxy_config OUT SIGN_TIMEOUT_MS HANDSHAKE_TIMEOUT_MS: the lab's same-host config, one worker.
proxy_config() {
  { echo "workers: 1"; sed -e "s/sign_timeout_ms: 2000/sign_timeout_ms: $2/" \
    -e "s/handshake_timeout_ms: 10000/handshake_timeout_ms: $3/" "$CUSTODY_PROXY_UNIX_CONFIG"; } >"$1"
}
# handshake NAME: one verified handshake through the proxy (s_client), 0 when it succeeded.
handshake() {
  echo | timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
    -servername "$1.lab.test" -verify_return_error 2>/dev/null | grep -q "Verify return code: 0"
}
# signs_on_socket_again: 0 once a handshake succeeds with its signature made on the signing
# socket (the proxy retries the socket once a second), within 5 s.
signs_on_socket_again() {
  local before i
  before=$(on_socket)
  for ((i = 0; i < 50; i++)); do
    if handshake ec256 && (($(on_socket) > before)); then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- every key and scheme
proxy_config "$E2E_TMP/proxy.yaml" 2000 10000
e2e_start_proxy "$E2E_TMP/proxy.yaml"
check "the proxy connected its worker to the signing socket" \
  grep -q "worker 0: signing socket $SOCK connected" "$E2E_TMP/proxy.log"
cases=(
  "ec256   -tls1_3 -          ecdsa_secp256r1_sha256"
  "ec384   -tls1_3 -          ecdsa_secp384r1_sha384"
  "rsa2048 -tls1_3 -          rsa_pss_rsae_sha256"
  "ed25519 -tls1_3 -          ed25519"
  "rsa2048 -tls1_2 RSA+SHA256 rsa_pkcs1_sha256"
)
for spec in "${cases[@]}"; do
  read -r name proto sigalgs scheme <<<"$spec"
  extra=()
  [[ "$sigalgs" == - ]] || extra=(-sigalgs "$sigalgs")
  before=$(audit_count)
  printf 'GET /sign-%s HTTP/1.0\r\n\r\n' "$name" |
    timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
      -servername "$name.lab.test" -verify_return_error -ign_eof "$proto" "${extra[@]}" \
      >"$E2E_TMP/client.out" 2>&1 || true
  what="$name $proto ${sigalgs/#-/default}"
  check "$what: verified, backend answered" bash -c "grep -q 'Verify return code: 0 (ok)' \
    '$E2E_TMP/client.out' && grep -q 'GET /sign-$name' '$E2E_TMP/client.out'"
  check "$what: one audit record" test "$(audit_count)" -eq $((before + 1))
  check "$what: signed on the signing socket by uid $UID_NOW, lab-$name, $scheme" bash -c \
    "tail -n 1 '$CUSTODY_AUDIT_LOG' | grep -q '\"caller\":\"proxy\",\"peer\":\"unix:$SOCK pid=[0-9]* uid=$UID_NOW\",\"action\":\"sign\",\"key\":\"lab-$name\",\"version\":1,\"scheme\":\"$scheme\",\"outcome\":\"OK\"'"
done
check "no signature went over gRPC" test "$(over_grpc)" -eq 0
check "metrics: the worker is connected to the signing socket" \
  test "$(proxy_metric custody_proxy_signing_socket_connected)" -eq 1
check "metrics: 5 signatures sent on the signing socket" test "$(proxy_metric \
  'custody_proxy_signing_socket_requests_total{outcome="sent"}')" -eq 5
e2e_stop_proxy TERM
e2e_stop_backend
e2e_start_backend echo # For the relay checks below.

# ---------------------------------------------------------------- the worker never blocks
proxy_config "$E2E_TMP/held.yaml" 30000 30000
e2e_start_proxy "$E2E_TMP/held.yaml"
before=$(on_socket)
run_capture python3 "$CLIENT" relay-while-held "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" "$CTL" 24
[[ $E2E_RC -eq 0 ]] || { _e2e_show_output; fail "relay-while-held"; }
while read -r line; do pass "held on the signing socket: ${line#ok: }"; done < <(grep '^ok:' "$E2E_OUT")
check "the held handshakes were signed on the signing socket" test "$(on_socket)" -ge $((before + 24))
check "none went over gRPC" test "$(over_grpc)" -eq 0
e2e_stop_proxy TERM
check "proxy drained and exited 0" test "$PROXY_RC" -eq 0

# ---------------------------------------------------------------- keyd killed and restarted
proxy_config "$E2E_TMP/short.yaml" 2000 1500
e2e_start_proxy "$E2E_TMP/short.yaml"
e2e_kill_keyd_under_proxy
check "keyd down: the proxy logged that keyd closed the signing socket" \
  grep -q "worker 0: signing socket $SOCK: keyd closed it" "$E2E_TMP/proxy.log"
e2e_start_keyd
check "keyd back: handshakes succeed on the signing socket again" signs_on_socket_again
check "keyd back: the proxy is the same process" kill -0 "$PROXY_PID"
e2e_stop_proxy TERM

# ---------------------------------------------------------------- keyd without a signing socket
e2e_stop_keyd TERM
check "keyd removed its signing socket when it stopped" test ! -e "$SOCK"
cp "$CUSTODY_KEYD_CONFIG" "$E2E_TMP/keyd-with-socket.yaml"
sed -i '/signing_path:/d' "$CUSTODY_KEYD_CONFIG"
e2e_start_keyd
e2e_start_proxy "$E2E_TMP/short.yaml"
before=$(over_grpc)
check "no signing socket: handshakes succeed" handshake ec256
check "no signing socket: the signature went over gRPC" test "$(over_grpc)" -eq $((before + 1))
check "no signing socket: the proxy said so" grep -q "signing socket $SOCK unreachable" \
  "$E2E_TMP/proxy.log"
check "no signing socket: counted as sent over gRPC" test "$(proxy_metric \
  'custody_proxy_signing_socket_requests_total{outcome="grpc"}')" -ge 1
check "no signing socket: no worker connected" \
  test "$(proxy_metric custody_proxy_signing_socket_connected)" -eq 0
e2e_stop_keyd TERM
cp "$E2E_TMP/keyd-with-socket.yaml" "$CUSTODY_KEYD_CONFIG"
e2e_start_keyd
check "the signing socket back: the proxy returns to it without a restart" signs_on_socket_again

# ---------------------------------------------------------------- bad input on the socket
cat >"$E2E_TMP/bad_input.py" <<'PY'
import socket, struct, sys
sock = sys.argv[1]

def frame(body):
    return struct.pack(">I", len(body)) + body

def item(id_, key="lab-ec256"):
    # SignStreamItem {id: 1, request: 2 {key_name: 1, digest: 4}, timeout_ms: 3}
    req = b"\x0a" + bytes([len(key)]) + key.encode() + b"\x22\x20" + b"\x01" * 32
    return b"\x08" + bytes([id_]) + b"\x12" + bytes([len(req)]) + req + b"\x18\xd0\x0f"

cases = {
    "no preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "not a request": b"CSIGN/1\n" + frame(b"\xff\xff\xff\xff"),
    "oversized": b"CSIGN/1\n" + struct.pack(">I", 50_000_000),
    "empty request": b"CSIGN/1\n" + frame(b""),
    "repeated id": b"CSIGN/1\n" + frame(b"\x0a" + bytes([len(item(5))]) + item(5) * 1
                                         + b"\x0a" + bytes([len(item(5))]) + item(5)),
}
for name, data in cases.items():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    s.sendall(data)
    try:
        got = s.recv(4096)
    except socket.timeout:
        print(f"{name}: still open after 10 s")
        continue
    except ConnectionResetError:
        got = b""  # Closed with our bytes unread.
    print(f"{name}: closed" if got == b"" else f"{name}: answered {got!r}")
    s.close()
PY
run_capture python3 "$E2E_TMP/bad_input.py" "$SOCK"
for name in "no preface" "not a request" "oversized" "empty request" "repeated id"; do
  check "bad input ($name): keyd closed that connection" grep -qx "$name: closed" "$E2E_OUT"
done
for why in "did not open with the signing protocol's preface" "a frame is not a SignStreamRequest" \
  "a frame is larger than" "holds 1 to 64 items, not 0" "is already pending"; do
  check "bad input logged: $why" grep -q "signing socket: unix:$SOCK.*$why.*connection closed" \
    "$E2E_TMP/keyd.log"
  check "bad input audited: $why" grep -q "\"action\":\"signing_socket\",.*\"outcome\":\"INVALID_ARGUMENT\",\"detail\":\"[^\"]*$why" \
    "$CUSTODY_AUDIT_LOG"
done
check "after the bad input, keyd still signs for the proxy on the signing socket" \
  bash -c "before=\$(grep -c 'unix:$SOCK pid' '$CUSTODY_AUDIT_LOG'); echo | timeout 20 openssl s_client \
    -connect '$CUSTODY_PROXY_ADDR' -CAfile '$CUSTODY_CA' -servername ec256.lab.test \
    -verify_return_error 2>/dev/null | grep -q 'Verify return code: 0' && \
    test \$(grep -c 'unix:$SOCK pid' '$CUSTODY_AUDIT_LOG') -gt \$before"
e2e_stop_proxy TERM

# ---------------------------------------------------------------- a uid not allowed
e2e_stop_keyd TERM
sed -i "s/^  identity: \"proxy\"/  identity: \"proxy\"\n  allowed_uids: [$((UID_NOW + 1))]/" "$CUSTODY_KEYD_CONFIG"
e2e_start_keyd
run_capture python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
try:
    s.sendall(b"CSIGN/1\n")
    print("closed" if s.recv(10) == b"" else "answered")
except (BrokenPipeError, ConnectionResetError):
    print("closed")' "$SOCK"
check "uid $UID_NOW not allowed: the connection is closed" grep -qx closed "$E2E_OUT"
check "uid $UID_NOW not allowed: audited as a refused connect" grep -q \
  "\"peer\":\"unix:$SOCK pid=[0-9]* uid=$UID_NOW\",\"action\":\"connect\",.*\"outcome\":\"PERMISSION_DENIED\"" \
  "$CUSTODY_AUDIT_LOG"

e2e_finish
