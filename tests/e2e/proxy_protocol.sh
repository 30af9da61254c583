#!/usr/bin/env bash
# backend.proxy_protocol: the proxy sends the backend a PROXY protocol header (v2, then v1 after
# a reload) before the client's bytes, and the backend learns the client's real address. The lab
# backend runs with --proxy-protocol, so a connection without a valid header gets nothing.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

e2e_setup
"$BACKEND" --listen "$CUSTODY_BACKEND_ADDR" --mode http --proxy-protocol \
  >>"$E2E_TMP/backend.log" 2>&1 </dev/null &
BACKEND_PID=$!
wait_tcp "$CUSTODY_BACKEND_ADDR" 10 || fail "custody-lab-backend did not listen"
check "a request without a PROXY header gets no answer" \
  bash -c "! curl -sf -m 5 http://$CUSTODY_BACKEND_ADDR/direct"

# with_proxy_protocol VERSION: the lab's proxy config with backend.proxy_protocol set.
with_proxy_protocol() {
  sed "s/^\(      address: \"127.0.0.1:[0-9]*\"\)$/\1\n      proxy_protocol: \"$1\"/" \
    "$CUSTODY_PROXY_CONFIG" >"$E2E_TMP/proxy.yaml"
  grep -q "proxy_protocol: \"$1\"" "$E2E_TMP/proxy.yaml"
}
check "proxy config with proxy_protocol: v2" with_proxy_protocol v2
e2e_start_proxy "$E2E_TMP/proxy.yaml"
PORT=${CUSTODY_PROXY_ADDR##*:}

# names_client PATH: one request through the proxy; the backend's answer names the client's
# own address and port (curl prints its local port after the body).
names_client() {
  local out port
  out=$(curl -sf --cacert "$CUSTODY_CA" --resolve "ec256.lab.test:$PORT:127.0.0.1" \
    -w '\n%{local_port}' "https://ec256.lab.test:$PORT$1") || return 1
  port=$(tail -n 1 <<<"$out")
  grep -qF "hello from the custody lab backend: GET $1 (client 127.0.0.1:$port)" <<<"$out" ||
    { echo "answer: $out"; return 1; }
}
check "v2: the backend learns the client's address and port" names_client /v2
check "v2: again, from another client port" names_client /v2-again

reloads() { proxy_metric 'custody_proxy_config_reloads_total{outcome="ok"}'; }
check "proxy config with proxy_protocol: v1" with_proxy_protocol v1
kill -HUP "$PROXY_PID"
for ((i = 0; i < 100; i++)); do [[ "$(reloads)" -ge 1 ]] && break; sleep 0.1; done
check "SIGHUP: reload counted ok" test "$(reloads)" -ge 1
check "v1 (after the reload): the backend learns the client's address and port" names_client /v1

# The relayed-bytes metric counts the client's bytes, not the header the proxy adds.
to_backend() { proxy_metric 'custody_proxy_bytes_total{direction="client_to_backend",listener="lab"}'; }
before=$(to_backend)
answer=$(echo /counted | python3 "$E2E_LIB_DIR/proxy_client.py" hold "$CUSTODY_PROXY_ADDR" \
  "$CUSTODY_CA" ec256.lab.test)
check "a request on a held connection is answered" grep -q "200 OK" <<<"$answer"
request=$(printf 'GET /counted HTTP/1.1\r\nHost: ec256.lab.test\r\n\r\n' | wc -c)
check "bytes_total{client_to_backend} grew by the request's $request bytes, not the header's too" \
  test "$(($(to_backend) - before))" -eq "$request"

e2e_finish
