#!/usr/bin/env bash
# tests/e2e/access_and_bad_input.sh - who may do what, and what bad input gets, against a real
# custody-keyd: mutual TLS is not optional, the policy is enforced and audited, malformed and
# oversized requests get clear codes, garbage on the port does not hurt the service, the test
# hook works for admins only, the metrics count it all, and SIGTERM stops keyd cleanly.
# shellcheck disable=SC2119,SC2317 # e2e_setup takes no script arguments; helpers run via check
# shellcheck source=tests/e2e/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

e2e_setup
T=$E2E_TMP
W="$T/work"
mkdir -p -- "$W"
LOG=$CUSTODY_AUDIT_LOG
random_file "$W/msg" 300

sign_as() { # IDENTITY KEY SCHEME [ARGS...]: custodyctl sign of $W/msg into $W/sig
  local id=$1 key=$2 scheme=$3
  shift 3
  "$CTL" --identity "$id" sign --key "$key" --scheme "$scheme" --in "$W/msg" --out "$W/sig" "$@"
}
audit_lines() { wc -l <"$LOG"; }

# last_audit_record_matches FIELD=VALUE...: the last audit record has these fields.
last_audit_record_matches() {
  python3 - "$LOG" "$@" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
r = json.loads(lines[-1])
bad = {}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    if str(r.get(k)) != v:
        bad[k] = r.get(k)
if bad:
    print(f"last audit record differs: {bad}; record: {r}")
    sys.exit(1)
PY
}

# ------------------------------------------------------------ mutual TLS
# What shows "a caller without a client certificate cannot connect", robustly:
#  - With TLS 1.3 the client's handshake completes before the server has checked the client's
#    (empty) Certificate message, so `openssl s_client` exits 0 either way and proves nothing
#    by its exit status. It does show that the server REQUESTS a certificate ("Acceptable
#    client certificate CA names" lists the lab CA): checked below.
#  - The decisive check speaks HTTP/2 over TLS itself (python3 ssl): it sends the HTTP/2
#    connection preface and a SETTINGS frame and reads. A gRPC server answers with its own
#    SETTINGS frame (type 0x04) - and does so for a caller with the lab's proxy certificate
#    (control), but a caller with no certificate (TLS 1.3) or with a certificate from another
#    CA gets no HTTP/2 byte, only an alert or EOF. With TLS 1.2 the handshake itself fails.
#  - custodyctl with a certificate from a throwaway CA (CN=proxy, to try to impersonate the
#    proxy) gets UNAVAILABLE, and nothing is signed or audited.
cat >"$W/h2probe.py" <<'PY'
import socket, ssl, sys
addr, ca, tls, cert, key = sys.argv[1:6]
host, port = addr.rsplit(":", 1)
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
ctx.set_alpn_protocols(["h2"])
if tls == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
else:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
if cert != "-":
    ctx.load_cert_chain(cert, key)
raw = socket.create_connection((host, int(port)), timeout=5)
try:
    s = ctx.wrap_socket(raw)
except (ssl.SSLError, OSError) as e:
    print(f"REFUSED handshake: {e}")
    sys.exit(0)
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
    data = b""
    while len(data) < 9:
        chunk = s.recv(9 - len(data))
        if not chunk:
            break
        data += chunk
except (ssl.SSLError, OSError) as e:
    print(f"REFUSED after handshake: {e}")
    sys.exit(0)
if len(data) == 9 and data[3] == 0x04:
    print("SERVED: HTTP/2 SETTINGS frame from the server")
else:
    print(f"REFUSED: connection closed after {len(data)} bytes")
PY
h2probe() { python3 "$W/h2probe.py" "$CUSTODY_KEYD_ADDR" "$CUSTODY_CA" "$@"; }

expect_rc 0 h2probe 1.3 "$CUSTODY_PROXY_CERT" "$CUSTODY_PROXY_KEY"
check "control: with the proxy's certificate the server speaks HTTP/2" \
  file_contains "$E2E_OUT" "SERVED"
expect_rc 0 h2probe 1.3 - -
check "TLS 1.3 without a client certificate: no HTTP/2 byte from the server" \
  file_contains "$E2E_OUT" "REFUSED"
expect_rc 0 h2probe 1.2 - -
check "TLS 1.2 without a client certificate: the handshake fails" \
  file_contains "$E2E_OUT" "REFUSED handshake"

run_capture timeout 10 openssl s_client -connect "$CUSTODY_KEYD_ADDR" -CAfile "$CUSTODY_CA" \
  -alpn h2 -verify_return_error
check "s_client: the server requests a client certificate of the lab CA" \
  grep -A1 -q "Acceptable client certificate CA names" "$E2E_OUT"
check "s_client: the acceptable CA is the lab CA" file_contains "$E2E_OUT" "custody lab CA"

# A throwaway CA and a client certificate CN=proxy from it.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=rogue CA" -keyout "$W/rogue-ca.key" -out "$W/rogue-ca.crt" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=proxy" \
  -keyout "$W/rogue.key" -out "$W/rogue.csr" 2>/dev/null
openssl x509 -req -days 1 -in "$W/rogue.csr" -CA "$W/rogue-ca.crt" -CAkey "$W/rogue-ca.key" \
  -set_serial 1 -out "$W/rogue.crt" 2>/dev/null
expect_rc 0 h2probe 1.3 "$W/rogue.crt" "$W/rogue.key"
check "TLS 1.3 with a certificate of another CA: no HTTP/2 byte from the server" \
  file_contains "$E2E_OUT" "REFUSED"
before=$(audit_lines)
rm -f -- "$W/sig"
expect_rpc_error UNAVAILABLE "$CTL" --identity proxy --cert "$W/rogue.crt" --key "$W/rogue.key" health
expect_rpc_error UNAVAILABLE "$CTL" --identity proxy --cert "$W/rogue.crt" --key "$W/rogue.key" \
  sign --key lab-ec256 --scheme ecdsa_secp256r1_sha256 --in "$W/msg" --out "$W/sig"
check "the rogue caller got no signature" test ! -e "$W/sig"
check "the rogue caller left no audit record" test "$(audit_lines)" = "$before"

# ------------------------------------------------------------ policy
expect_rpc_error PERMISSION_DENIED sign_as intruder lab-ec256 ecdsa_secp256r1_sha256
check "audit: intruder's sign refusal is recorded" last_audit_record_matches \
  caller=intruder action=sign key=lab-ec256 outcome=PERMISSION_DENIED
expect_rpc_error PERMISSION_DENIED "$CTL" --identity intruder keys show lab-ec256
check "audit: intruder's key read refusal is recorded" last_audit_record_matches \
  caller=intruder key=lab-ec256 outcome=PERMISSION_DENIED
expect_rc 0 "$CTL" --identity intruder keys list
check "intruder: keys list shows no key" test ! -s "$E2E_OUT"
expect_rc 0 "$CTL" --identity intruder -o json keys list
check "intruder: keys list (json) has no key" python3 -c '
import json, sys
sys.exit(1 if json.load(open(sys.argv[1])).get("keys") else 0)' "$E2E_OUT"
expect_rpc_error PERMISSION_DENIED "$CTL" --identity intruder testing close-sessions

expect_rpc_error PERMISSION_DENIED sign_as proxy lab-ca ecdsa_secp256r1_sha256
check "audit: proxy's attempt with the CA key is recorded" last_audit_record_matches \
  caller=proxy action=sign key=lab-ca outcome=PERMISSION_DENIED
# A key the proxy may not use and a key that does not exist look the same to it.
expect_rpc_error PERMISSION_DENIED sign_as proxy lab-nope ecdsa_secp256r1_sha256
expect_rpc_error PERMISSION_DENIED "$CTL" --identity proxy keys show lab-nope
expect_rpc_error NOT_FOUND "$CTL" --identity admin keys show lab-nope
# admin reads everything but signs nothing.
expect_rpc_error PERMISSION_DENIED sign_as admin lab-ec256 ecdsa_secp256r1_sha256
expect_rc 0 "$CTL" --identity admin keys show lab-ca

# ------------------------------------------------------------ bad input
random_file "$W/d31" 31
expect_rpc_error INVALID_ARGUMENT "$CTL" --identity proxy sign --key lab-ec256 \
  --scheme ecdsa_secp256r1_sha256 --digest --in "$W/d31" --out "$W/sig"
check "the digest length error says what is wanted" file_contains "$E2E_ERR" "32-byte digest"
expect_rpc_error INVALID_ARGUMENT sign_as proxy lab-ec256 ed25519
expect_rpc_error INVALID_ARGUMENT sign_as proxy lab-ec256 rsa_pss_rsae_sha256
expect_rpc_error INVALID_ARGUMENT sign_as proxy lab-rsa2048 ecdsa_secp256r1_sha256
expect_rpc_error INVALID_ARGUMENT sign_as proxy lab-ed25519 ecdsa_secp256r1_sha256
random_file "$W/d32" 32
expect_rpc_error INVALID_ARGUMENT "$CTL" --identity proxy sign --key lab-ed25519 --scheme ed25519 \
  --digest --in "$W/d32" --out "$W/sig"
expect_rpc_error NOT_FOUND sign_as proxy lab-ec256 ecdsa_secp256r1_sha256 --version 7
check "audit: the NOT_FOUND refusal is recorded" last_audit_record_matches \
  caller=proxy key=lab-ec256 outcome=NOT_FOUND
expect_rc 2 sign_as proxy lab-ec256 no_such_scheme

# Message size limit (limits.max_message_bytes = 65536). custodyctl hashes the message itself
# for ECDSA/RSA and sends the digest, so the limit is exercised with Ed25519, which sends it.
random_file "$W/m65536" 65536
random_file "$W/m65537" 65537
random_file "$W/m5M" $((5 * 1024 * 1024))
expect_rc 0 "$CTL" --identity proxy sign --key lab-ed25519 --scheme ed25519 \
  --in "$W/m65536" --out "$W/sig.65536"
openssl x509 -pubkey -noout -in "$CUSTODY_LAB_DIR/certs/lab-ed25519.crt" >"$W/ed.pub"
check "the 65536-byte Ed25519 signature verifies" openssl pkeyutl -verify -pubin \
  -inkey "$W/ed.pub" -rawin -in "$W/m65536" -sigfile "$W/sig.65536"
expect_rpc_error INVALID_ARGUMENT "$CTL" --identity proxy sign --key lab-ed25519 --scheme ed25519 \
  --in "$W/m65537" --out "$W/sig"
check "the size error names the limit" file_contains "$E2E_ERR" "65536"
# 5 MiB is far over the receive limit (max_message_bytes + 4 KiB): refused by the transport.
# A long deadline: sanitizer builds move 5 MiB slowly.
expect_rpc_error RESOURCE_EXHAUSTED "$CTL" --timeout-ms 60000 --identity proxy sign \
  --key lab-ed25519 --scheme ed25519 --in "$W/m5M" --out "$W/sig"
check "keyd is still running" kill -0 "$KEYD_PID"
expect_rc 0 "$CTL" health
expect_rc 0 sign_as proxy lab-ec256 ecdsa_secp256r1_sha256

# ------------------------------------------------------------ garbage on the port
# 64 KiB of random bytes; a plaintext HTTP request; a partial TLS ClientHello that stalls
# while health checks and a signature go through; then all are closed.
cat >"$W/garbage.py" <<'PY'
import os, socket, subprocess, sys
addr, ctl = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)
port = int(port)

def connect():
    return socket.create_connection((host, port), timeout=5)

s = connect()
try:
    s.sendall(os.urandom(64 * 1024))
    s.recv(4096)  # the server closes (or answers an alert); either is fine
except OSError:
    pass
s.close()

s = connect()
try:
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(4096)
except OSError:
    pass
s.close()

# TLS record header announcing 512 bytes of ClientHello; send 40 of them and stall.
stalled = [connect() for _ in range(3)]
for st in stalled:
    st.sendall(bytes.fromhex("1603010200" "010001fc" "0303") + os.urandom(34))
rc = subprocess.run([ctl, "--timeout-ms", "3000", "health"], capture_output=True, text=True)
print("health while stalled:", rc.returncode, rc.stdout.strip(), rc.stderr.strip())
for st in stalled:
    st.close()
sys.exit(rc.returncode)
PY
expect_rc 0 python3 "$W/garbage.py" "$CUSTODY_KEYD_ADDR" "$CTL"
check "health answered SERVING while partial ClientHellos stalled" \
  file_contains "$E2E_OUT" "SERVING"
check "keyd is still running after the garbage" kill -0 "$KEYD_PID"
expect_rc 0 "$CTL" health
check "health says SERVING" file_contains "$E2E_OUT" "SERVING"
expect_rc 0 sign_as proxy lab-rsa2048 rsa_pss_rsae_sha256

# ------------------------------------------------------------ test hook
expect_rpc_error PERMISSION_DENIED "$CTL" --identity proxy testing close-sessions
expect_rc 0 "$CTL" --identity admin testing close-sessions
check "audit: the hook call is recorded" last_audit_record_matches caller=admin outcome=OK
# After the token dropped every session (and logged out), each key type signs again.
expect_rc 0 sign_as proxy lab-ec256 ecdsa_secp256r1_sha256
expect_rc 0 sign_as proxy lab-ec384 ecdsa_secp384r1_sha384
expect_rc 0 sign_as proxy lab-rsa2048 rsa_pkcs1_sha256
expect_rc 0 sign_as proxy lab-ed25519 ed25519
expect_rc 0 "$CTL" --identity admin testing close-sessions
expect_rc 0 "$CTL" --identity admin testing close-sessions
expect_rc 0 sign_as proxy lab-ec256 ecdsa_secp256r1_sha256

# ------------------------------------------------------------ metrics
expect_rc 0 curl -sS --max-time 5 "http://$CUSTODY_KEYD_METRICS_ADDR/metrics"
cp -- "$E2E_OUT" "$W/metrics.txt"
check "metrics: custody_keyd_signatures_total{...code=\"OK\"...}" \
  grep -Eq '^custody_keyd_signatures_total\{.*code="OK"' "$W/metrics.txt"
check "metrics: custody_keyd_signatures_total{...code=\"PERMISSION_DENIED\"...}" \
  grep -Eq '^custody_keyd_signatures_total\{.*code="PERMISSION_DENIED"' "$W/metrics.txt"
check "metrics: custody_keyd_signatures_total{...code=\"INVALID_ARGUMENT\"...}" \
  grep -Eq '^custody_keyd_signatures_total\{.*code="INVALID_ARGUMENT"' "$W/metrics.txt"
check "metrics: custody_keyd_sign_duration_seconds_bucket" \
  grep -q '^custody_keyd_sign_duration_seconds_bucket{' "$W/metrics.txt"
check "metrics: a name sent by a caller (lab-nope) does not become a label" \
  file_lacks "$W/metrics.txt" 'key="lab-nope"'
# Refused GetKey calls are counted under the same method label as served ones ("GetKey"),
# so that per-method rates add up.
soft_check "metrics: refused GetKey counted as method=\"GetKey\"" \
  grep -Eq '^custody_keyd_requests_total\{code="PERMISSION_DENIED",method="GetKey"\}' "$W/metrics.txt"

# ------------------------------------------------------------ audit chain still intact
expect_rc 0 "$CTL" audit verify

# ------------------------------------------------------------ SIGTERM
pid=$KEYD_PID
e2e_stop_keyd TERM
check "custody-keyd (pid $pid) exited 0 on SIGTERM (got ${KEYD_RC})" test "$KEYD_RC" = 0
check "keyd logged that it stopped" grep -q "custody-keyd: stopped" "$T/keyd.log"
check "keyd is gone" bash -c "! kill -0 $pid 2>/dev/null"
expect_rpc_error UNAVAILABLE "$CTL" --timeout-ms 2000 health

e2e_finish
