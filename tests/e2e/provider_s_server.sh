#!/usr/bin/env bash
# The custody OpenSSL provider as a loadable module in a stock program: `openssl s_server
# -provider default -provider custody -key custody:key=NAME` completes TLS 1.3 and 1.2
# handshakes with `openssl s_client` for every lab key, each handshake signature is made by the
# key service (one audit record each), and a key service that refuses or is gone makes s_server
# fail to load the key with a clear error instead of hanging.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

CUSTODY_LIB_DIR=${CUSTODY_LIB_DIR:-$E2E_REPO/build/lib}
[[ -f "$CUSTODY_LIB_DIR/custody.so" ]] || { echo "missing $CUSTODY_LIB_DIR/custody.so"; exit 1; }
export OPENSSL_MODULES=$CUSTODY_LIB_DIR
# A sanitizer build's module needs its runtime loaded first in the stock openssl program
# (ci/sanitize.sh sets CUSTODY_ASAN_PRELOAD); openssl's own exit-time allocations are not ours.
OPENSSL_M=(openssl)
if [[ -n "${CUSTODY_ASAN_PRELOAD:-}" ]]; then
  OPENSSL_M=(env "LD_PRELOAD=$CUSTODY_ASAN_PRELOAD" "ASAN_OPTIONS=detect_leaks=0" openssl)
fi

e2e_setup
W="$E2E_TMP/work"
mkdir -p -- "$W"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# handshake KEY S_CLIENT_ARGS...: one s_server (bounded by timeout) for one connection, and an
# s_client against it; the client's output ends up in $W/client.out.
handshake() {
  local key=$1 port i
  shift
  port=$(free_port)
  timeout 20 "${OPENSSL_M[@]}" s_server -provider default -provider custody -accept "127.0.0.1:$port" \
    -key "custody:key=$key" -cert "$CUSTODY_LAB_DIR/certs/$key.crt" -naccept 1 -www \
    >"$W/server.out" 2>&1 </dev/null &
  local server=$!
  # Until s_server listens (or is gone): its own timeout bounds the wait, not a guess of ours.
  until grep -q '^ACCEPT' "$W/server.out" 2>/dev/null; do
    kill -0 "$server" 2>/dev/null || break
    sleep 0.05
  done
  echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" -CAfile "$CUSTODY_CA" \
    -servername localhost "$@" >"$W/client.out" 2>&1 || true
  wait "$server" 2>/dev/null || true
  if ! grep -q "Verify return code: 0 (ok)" "$W/client.out"; then
    echo "--- s_server said:"
    sed 's/^/  | /' "$W/server.out" | tail -n 15
    echo "--- s_client said:"
    sed 's/^/  | /' "$W/client.out" | tail -n 15
  fi
}

audit_count() { wc -l <"$CUSTODY_AUDIT_LOG"; }

# KEY  PROTOCOL  CLIENT SIGALGS  EXPECTED PEER SIGNATURE TYPE  EXPECTED AUDITED SCHEME
cases=(
  "lab-ec256   -tls1_3 -            ECDSA   ecdsa_secp256r1_sha256"
  "lab-ec384   -tls1_3 -            ECDSA   ecdsa_secp384r1_sha384"
  "lab-rsa2048 -tls1_3 -            RSA-PSS rsa_pss_rsae_sha256"
  "lab-ed25519 -tls1_3 -            ed25519 ed25519"
  "lab-ec256   -tls1_2 -            ECDSA   ecdsa_secp256r1_sha256"
  "lab-rsa2048 -tls1_2 RSA+SHA256   RSA     rsa_pkcs1_sha256"
  "lab-rsa2048 -tls1_2 RSA+SHA384   RSA     rsa_pkcs1_sha384"
  "lab-rsa2048 -tls1_2 RSA-PSS+SHA256 RSA-PSS rsa_pss_rsae_sha256"
)
for spec in "${cases[@]}"; do
  read -r key proto sigalgs peer scheme <<<"$spec"
  extra=()
  [[ "$sigalgs" == - ]] || extra=(-sigalgs "$sigalgs")
  before=$(audit_count)
  handshake "$key" "$proto" "${extra[@]}"
  what="$key $proto ${sigalgs/#-/default}"
  check "$what: handshake verified" file_contains "$W/client.out" "Verify return code: 0 (ok)"
  check "$what: protocol ${proto#-}" file_contains "$W/client.out" \
    "New, TLSv1.${proto: -1}"
  check "$what: peer signature type $peer" file_contains "$W/client.out" \
    "Peer signature type: $peer"
  after=$(audit_count)
  check "$what: one audit record" test "$after" -eq $((before + 1))
  check "$what: audited as $scheme by proxy" grep -q \
    "\"caller\":\"proxy\".*\"key\":\"$key\",\"version\":1,\"scheme\":\"$scheme\",\"outcome\":\"OK\"" \
    <(tail -n 1 "$CUSTODY_AUDIT_LOG")
done

# An identity without rights: the key cannot even be loaded (GetKey refused), clearly.
CUSTODY_IDENTITY=intruder timeout 20 "${OPENSSL_M[@]}" s_server -provider default -provider custody \
  -accept "127.0.0.1:$(free_port)" -key custody:key=lab-ec256 \
  -cert "$CUSTODY_LAB_DIR/certs/lab-ec256.crt" -naccept 1 >"$W/intruder.out" 2>&1 </dev/null || true
check "intruder: s_server refuses to start" file_lacks "$W/intruder.out" "ACCEPT"
check "intruder: the reason is PERMISSION_DENIED" file_contains "$W/intruder.out" \
  "PERMISSION_DENIED"

# A malformed URI is refused with a clear message.
timeout 20 "${OPENSSL_M[@]}" s_server -provider default -provider custody -accept "127.0.0.1:$(free_port)" \
  -key "custody:name=lab-ec256" -cert "$CUSTODY_LAB_DIR/certs/lab-ec256.crt" -naccept 1 \
  >"$W/uri.out" 2>&1 </dev/null || true
check "bad URI: refused, naming the attribute" file_contains "$W/uri.out" "unknown attribute 'name'"

# The key service gone: loading fails within the deadline, no hang.
e2e_stop_keyd TERM
down_rc=0
timeout 30 "${OPENSSL_M[@]}" s_server -provider default -provider custody -accept "127.0.0.1:$(free_port)" \
  -key custody:key=lab-ec256 -cert "$CUSTODY_LAB_DIR/certs/lab-ec256.crt" -naccept 1 \
  >"$W/down.out" 2>&1 </dev/null || down_rc=$?
check "keyd down: s_server refuses to start" file_lacks "$W/down.out" "ACCEPT"
check "keyd down: the reason is the key service" file_contains "$W/down.out" "key service"
check "keyd down: s_server gave up by itself, no hang (status $down_rc, timeout(1) says 124)" \
  test "$down_rc" -ne 124

e2e_finish
