#!/usr/bin/env bash
# bench/proxy.sh: custody-proxy against nginx, side by side in one run, as ratios.
#
#   bench/proxy.sh [--seconds N] [--rounds R] [--keyd-transport socket|unix|tcp] [--sections 1,2,3,4,5]
#                  [--session-tickets N] [--relay-turn-bytes N] [--build DIR]
#
# One SoftHSM2 lab without Ed25519 (libp11's engine cannot read a token holding one), one
# plaintext backend (custody-lab-backend), and three TLS servers in front of it, each with one
# worker pinned to CPU 0 (the load generator and the backend run on CPU 1):
#   custody-proxy   keys in the token, signatures by custody-keyd (also on CPU 0), reached over
#                   keyd's signing socket (default "socket": the two share the host; the rest over
#                   gRPC on keyd's Unix socket), gRPC on keyd's Unix socket alone ("unix"), or
#                   gRPC with mutual TLS on TCP ("tcp")
#   nginx-file      nginx 1.22 stream proxy (TLS offload, the same relay job), the same kind of
#                   certificate from the same CA, its key in a local file
#   nginx-engine    the same nginx, the certificate's key in the same token through libp11's
#                   pkcs11 engine (master_process off: libp11 sessions do not survive fork)
#   nginx-matched   nginx-file (and nginx-engine-matched: nginx-engine) with the proxy's TLS defaults
#                   in place of OpenSSL's (AES-128-GCM before AES-256-GCM, one session ticket per
#                   handshake, not two); no goal is judged on them (the goals are against stock
#                   nginx), they show how much of a ratio those defaults make
# Figures (server CPU from /proc: utime+stime of the server's processes over the run):
#   1. TLS 1.3 full handshakes (no tickets, no session cache: the client checks none resumed),
#      ECDSA P-256 and RSA-2048: server CPU per handshake. Goals: proxy <= 0.9 x nginx-file;
#      proxy + keyd <= 1.0 x nginx-engine.
#   2. 5 ms injected key-service latency (keyd test hook), 64 clients: handshake rate with it
#      over the rate without it. Goal >= 0.9 (a worker that blocked would cap at 200/s).
#   3. Bulk relay: one connection moving 1 GiB, then 8 at once moving 256 MiB each: proxy CPU
#      seconds per GB and MB/s against nginx-file's stream proxy.
#   4. Added latency of a small keep-alive request (p50, p99) over the backend reached directly,
#      percentiles over every round's requests (blocks of the three interleaved).
#   5. Latency of a small keep-alive request while 8 downloads run on the same worker (p50,
#      p99), through the proxy and nginx-file: what a busy transfer costs the others. No goal.
# The machine is shared and noisy: read ratios, not absolute figures. Each figure is measured in
# R rounds (default 3) that interleave our server and the peers, in an order that rotates from
# round to round (the nginx set-ups of the bulk and latency figures run through their whole
# section, like the proxy; the handshake figure starts each afresh), each round gives a ratio,
# and the median ratio is the result (a burst of load from elsewhere then spoils one round, not the
# figure); latency percentiles are taken over the requests of all rounds instead. --sections
# picks which of the five figures to measure (default all); --session-tickets sets the proxy's
# tls.session_tickets and nginx-matched's ticket count (default: the proxy's own default, 1;
# stock nginx sends OpenSSL's 2, and a ticket costs the server CPU on every full handshake);
# --relay-turn-bytes sets the proxy's limits.relay_turn_bytes (default 2 MiB).
# Loopback only; every load is bounded in time or bytes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$ROOT/build
SECS=5
ROUNDS=3
TRANSPORT=socket
SECTIONS=1,2,3,4,5
TICKETS=
TURN=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --keyd-transport) TRANSPORT=$2; shift 2 ;;
    --sections) SECTIONS=$2; shift 2 ;;
    --session-tickets) TICKETS=$2; shift 2 ;;
    --relay-turn-bytes) TURN=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    *) echo "usage: bench/proxy.sh [--seconds N] [--rounds R] [--keyd-transport socket|unix|tcp] [--sections 1,2,3,4,5] [--session-tickets N] [--relay-turn-bytes N] [--build DIR]" >&2
       exit 2 ;;
  esac
done
case "$TRANSPORT" in
  socket | unix | tcp) ;;
  *) echo "bench/proxy.sh: --keyd-transport is socket, unix or tcp, not '$TRANSPORT'" >&2; exit 2 ;;
esac
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }  # want N: section N was asked for
BIN=$BUILD/bin
for b in custody-keyd custody-proxy custody-lab-backend custody-bench-tls custodyctl; do
  [ -x "$BIN/$b" ] || { echo "bench/proxy.sh: $BIN/$b missing; run ci/build.sh first" >&2; exit 2; }
done

# The peer: nginx with its stream module (installed without starting the distribution's
# service).
if ! command -v nginx >/dev/null || [ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  echo "bench/proxy.sh: installing nginx-light and libnginx-mod-stream (the peer)" >&2
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light \
      libnginx-mod-stream; } >/dev/null || { rm -f /usr/sbin/policy-rc.d; exit 1; }
  rm -f /usr/sbin/policy-rc.d
fi
NCPU=$(nproc)
SERVER_CPU=0
CLIENT_CPU=$((NCPU > 1 ? 1 : 0))
pin_client() { taskset -c "$CLIENT_CPU" "$@"; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/custody-bench-proxy-XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

"$ROOT/hsm/lab.sh" init "$TMP/lab" --no-ed25519 >"$TMP/lab.log" 2>&1
# shellcheck disable=SC1091
source "$TMP/lab/lab.env"
LAB=$CUSTODY_LAB_DIR
sed -i 's/^  sessions: .*/  sessions: 16/' "$CUSTODY_KEYD_CONFIG"
free_ports() {
  python3 -c 'import socket,sys
s=[socket.socket() for _ in range(int(sys.argv[1]))]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}
read -r NGINX_FILE_PORT NGINX_MATCHED_PORT NGINX_ENGINE_PORT < <(free_ports 3)

# Equivalent file-key certificates for nginx-file: same subjects and SANs, same key types,
# issued by the lab CA (its key in the token, through the engine).
ENGINE_CNF=$LAB/openssl-engine.cnf
mkdir -p "$TMP/file"
for name in ec256 rsa2048; do
  if [ "$name" = ec256 ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TMP/file/$name.key" 2>/dev/null
  else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/file/$name.key" 2>/dev/null
  fi
  openssl x509 -in "$LAB/certs/lab-$name.crt" -noout -ext subjectAltName | tail -n 1 |
    sed -e 's/^ */subjectAltName = /' -e 's/IP Address:/IP:/g' >"$TMP/file/$name.ext"
  echo "extendedKeyUsage = serverAuth" >>"$TMP/file/$name.ext"
  openssl req -new -key "$TMP/file/$name.key" -subj "/O=custody lab/CN=$name.lab.test" \
    -out "$TMP/file/$name.csr" 2>/dev/null
  OPENSSL_CONF=$ENGINE_CNF openssl x509 -req -in "$TMP/file/$name.csr" -days 30 -sha256 \
    -CA "$LAB/ca.crt" -engine pkcs11 -CAkeyform engine \
    -CAkey "pkcs11:token=$CUSTODY_TOKEN_LABEL;object=lab-ca;type=private" \
    -set_serial "0x$(openssl rand -hex 8)" -extfile "$TMP/file/$name.ext" \
    -out "$TMP/file/$name.crt" </dev/null >/dev/null 2>&1
  openssl verify -CAfile "$LAB/ca.crt" "$TMP/file/$name.crt" >/dev/null
done

start() { # start NAME CPU CMD...: run CMD pinned to CPU in the background, remember its pid
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >"$TMP/$name.log" 2>&1 </dev/null &
  PIDS+=($!)
  eval "${name//-/_}_PID=$!"
}
wait_port() {
  for _ in $(seq 1 400); do
    python3 -c 'import socket,sys; h,p=sys.argv[1].rsplit(":",1); socket.create_connection((h,int(p)),1).close()' "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench/proxy.sh: nothing listens on $1" >&2
  exit 1
}

start backend "$CLIENT_CPU" "$BIN/custody-lab-backend" --listen "$CUSTODY_BACKEND_ADDR"
start keyd "$SERVER_CPU" "$BIN/custody-keyd" --config "$CUSTODY_KEYD_CONFIG" --log-level warn --enable-test-hooks
for _ in $(seq 1 200); do "$BIN/custodyctl" --identity proxy health >/dev/null 2>&1 && break; sleep 0.05; done
case "$TRANSPORT" in
  socket | unix)
    # keyd on the same host: its Unix sockets (callers known by uid), no TLS between the two.
    [ -n "${CUSTODY_PROXY_UNIX_CONFIG:-}" ] || { echo "bench/proxy.sh: the lab has no keyd socket" >&2; exit 1; }
    if [ "$TRANSPORT" = socket ]; then
      { echo "workers: 1"; cat "$CUSTODY_PROXY_UNIX_CONFIG"; } >"$TMP/proxy.yaml"
    else
      { echo "workers: 1"; grep -v "signing_socket:" "$CUSTODY_PROXY_UNIX_CONFIG"; } >"$TMP/proxy.yaml"
    fi
    ;;
  tcp) { echo "workers: 1"; cat "$CUSTODY_PROXY_CONFIG"; } >"$TMP/proxy.yaml" ;;
esac
if [ -n "$TICKETS" ]; then
  # Tickets per full handshake: the proxy's default is 1; nginx (OpenSSL's default) sends 2.
  sed -i "s/^    tls:\$/    tls:\n      session_tickets: $TICKETS/" "$TMP/proxy.yaml"
  grep -q "session_tickets: $TICKETS" "$TMP/proxy.yaml" || { echo "bench/proxy.sh: no tls section to set session_tickets in" >&2; exit 1; }
fi
if [ -n "$TURN" ]; then
  # The proxy's limits.relay_turn_bytes (default 2 MiB): what a connection moves each way per
  # loop turn before the others go first.
  sed -i "s/^limits:\$/limits:\n  relay_turn_bytes: $TURN/" "$TMP/proxy.yaml"
  grep -q "relay_turn_bytes: $TURN" "$TMP/proxy.yaml" || { echo "bench/proxy.sh: no limits section to set relay_turn_bytes in" >&2; exit 1; }
fi
start proxy "$SERVER_CPU" "$BIN/custody-proxy" --config "$TMP/proxy.yaml" --log-level warn
wait_port "$CUSTODY_BACKEND_ADDR"
wait_port "$CUSTODY_PROXY_ADDR"

nginx_conf() { # nginx_conf NAME PORT CERT KEY MASTER [DIRECTIVES]
  cat >"$TMP/$1.conf" <<NGINX
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
master_process $5;
pid $TMP/$1.pid;
error_log $TMP/$1-error.log warn;
env OPENSSL_CONF;
events { worker_connections 8192; }
stream {
  server {
    listen 127.0.0.1:$2 ssl;
    ssl_certificate $3;
    ssl_certificate_key "$4";
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    proxy_pass $CUSTODY_BACKEND_ADDR;${6:+
    $6}
  }
}
NGINX
}
# nginx-matched: nginx-file with the proxy's TLS defaults instead of OpenSSL's (read from
# proxy/tls_context.cc): AES-128-GCM before AES-256-GCM, one session ticket per handshake, not
# two. Its figures are printed beside the goals' (which are against stock nginx) to show what
# the defaults account for.
proxy_default() { # proxy_default NAME: the value of the string constant NAME in tls_context.cc
  python3 - "$ROOT/proxy/tls_context.cc" "$1" <<'PY'
import re, sys
m = re.search(sys.argv[2] + r'\[\] =\s*((?:"[^"]*"\s*)+);', open(sys.argv[1]).read())
if m is None:
    sys.exit("bench/proxy.sh: no " + sys.argv[2] + " in " + sys.argv[1])
print("".join(re.findall(r'"([^"]*)"', m.group(1))))
PY
}
PROXY_CIPHERS=$(proxy_default kDefaultCiphers)
PROXY_SUITES=$(proxy_default kDefaultCiphersuites)
PROXY_TICKETS=${TICKETS:-$(sed -n 's/.*kDefaultSessionTickets = \([0-9]*\);.*/\1/p' "$ROOT/proxy/tls_context.cc")}
[ -n "$PROXY_TICKETS" ] || { echo "bench/proxy.sh: no kDefaultSessionTickets in proxy/tls_context.cc" >&2; exit 1; }
MATCHED="ssl_ciphers $PROXY_CIPHERS;
    ssl_conf_command Ciphersuites $PROXY_SUITES;
    ssl_conf_command NumTickets $PROXY_TICKETS;"
for name in ec256 rsa2048; do
  nginx_conf "nginx-file-$name" "$NGINX_FILE_PORT" "$TMP/file/$name.crt" "$TMP/file/$name.key" on
  nginx_conf "nginx-matched-$name" "$NGINX_MATCHED_PORT" "$TMP/file/$name.crt" "$TMP/file/$name.key" on "$MATCHED"
done
for name in ec256 rsa2048; do
  nginx_conf "nginx-engine-$name" "$NGINX_ENGINE_PORT" "$LAB/certs/lab-$name.crt" \
    "engine:pkcs11:pkcs11:object=lab-$name;type=private" off
  nginx_conf "nginx-engine-matched-$name" "$NGINX_ENGINE_PORT" "$LAB/certs/lab-$name.crt" \
    "engine:pkcs11:pkcs11:object=lab-$name;type=private" off "$MATCHED"
done

# cpu_ticks PID...: utime+stime (clock ticks) of the processes and their children processes.
cpu_ticks() {
  local total=0 p c
  for p in "$@"; do
    for c in $p $(pgrep -P "$p" || true); do
      [ -r "/proc/$c/stat" ] || continue
      total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$c/stat")))
    done
  done
  echo "$total"
}
TICK=$(getconf CLK_TCK)
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
us_per() { awk -v t="$1" -v n="$2" -v hz="$TICK" 'BEGIN { printf "%.0f", (n > 0 ? t / hz * 1e6 / n : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# rotate N ITEM...: the items, starting at the (N mod count)-th (rounds alternate who goes first)
rotate() {
  local n=$1 i k
  shift
  for ((i = 0; i < $#; i++)); do
    k=$(((n + i) % $#))
    echo "${@:k+1:1}"
  done
}
# pct FILE Q: the Q-th percentile (0-100) of the samples in FILE
pct() { sort -g "$1" | awk -v q="$2" '{ v[NR] = $1 } END { i = int(NR * q / 100) + 1; if (i > NR) i = NR; printf "%.1f", v[i] }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# handshake_run ADDR SNI CONC PIDS...: prints "handshakes rate cpu_ticks..." (one per pid group)
handshake_run() {
  local addr=$1 sni=$2 conc=$3
  shift 3
  local before=() after=() p out
  for p in "$@"; do before+=("$(cpu_ticks $p)"); done
  out=$(pin_client "$BIN/custody-bench-tls" handshake --connect "$addr" --sni "$sni" \
    --ca "$CUSTODY_CA" -c "$conc" --seconds "$SECS")
  for p in "$@"; do after+=("$(cpu_ticks $p)"); done
  local resumed
  resumed=$(field resumed "$out")
  [ "$resumed" = 0 ] || { echo "bench/proxy.sh: $resumed handshakes were resumed" >&2; exit 1; }
  printf '%s %s' "$(field handshakes "$out")" "$(field rate "$out")"
  local i
  for i in "${!before[@]}"; do printf ' %s' $((after[i] - before[i])); done
  echo
}

stop_nginx() { # stop_nginx [VAR]: stops the nginx started as VAR (default nginx)
  local pid="${1:-nginx}_PID"
  kill -TERM "${!pid}" 2>/dev/null || true
  wait "${!pid}" 2>/dev/null || true
}
start_nginx() { # start_nginx NAME PORT [VAR]: its pid in VAR_PID (default nginx_PID)
  if [ "${1#nginx-engine}" != "$1" ]; then
    # (An environment assignment needs env(1).)
    start "${3:-nginx}" "$SERVER_CPU" env OPENSSL_CONF="$ENGINE_CNF" nginx -c "$TMP/$1.conf"
  else
    start "${3:-nginx}" "$SERVER_CPU" nginx -c "$TMP/$1.conf"
  fi
  wait_port "127.0.0.1:$2"
}

# suite ADDR: the TLS 1.3 suite a stock client gets from ADDR
suite() {
  openssl s_client -connect "$1" -servername ec256.lab.test -tls1_3 </dev/null 2>/dev/null |
    sed -n 's/.*Cipher is //p' | head -n 1
}
nginx_port() { # nginx_port KIND: the port of nginx-KIND (both engine set-ups share one)
  case $1 in
    file) echo "$NGINX_FILE_PORT" ;;
    matched) echo "$NGINX_MATCHED_PORT" ;;
    *) echo "$NGINX_ENGINE_PORT" ;;
  esac
}
# The suites each server picks; nginx-matched must pick the proxy's.
declare -A SUITE
SUITE[proxy]=$(suite "$CUSTODY_PROXY_ADDR")
for kind in file matched; do
  start_nginx "nginx-$kind-ec256" "$(nginx_port "$kind")"
  SUITE[$kind]=$(suite "127.0.0.1:$(nginx_port "$kind")")
  stop_nginx
done
if [ -z "${SUITE[proxy]}" ] || [ "${SUITE[proxy]}" != "${SUITE[matched]}" ]; then
  echo "bench/proxy.sh: nginx-matched picks '${SUITE[matched]}', the proxy '${SUITE[proxy]}'" >&2
  exit 1
fi
echo "# bench/proxy.sh: $SECS s per run, server CPU $SERVER_CPU, client CPU $CLIENT_CPU, $(nginx -v 2>&1), proxy to keyd over $TRANSPORT, proxy session tickets ${TICKETS:-1 (default)}, relay turn ${TURN:-$(sed -n 's/.*kDefaultRelayTurnBytes = \([0-9]*\);.*/\1/p' "$ROOT/proxy/config.h") (default)} bytes"
echo "# TLS 1.3 suites: custody-proxy ${SUITE[proxy]}, nginx-file ${SUITE[file]} (stock), nginx-matched ${SUITE[matched]} (the proxy's defaults)"
if want 1; then
echo
echo "## 1. TLS 1.3 full handshakes, 16 clients: server CPU per handshake (us), $ROUNDS rounds"
printf '%-5s %-8s %-20s %9s %8s %10s %10s %10s\n' round key server handshakes rate/s "proxy us" "keyd us" "total us"
declare -A R
declare -A RATIO
for round in $(seq 1 "$ROUNDS"); do
  for name in ec256 rsa2048; do
    # shellcheck disable=SC2046
    for kind in $(rotate "$round" proxy file matched engine engine-matched); do
      if [ "$kind" = proxy ]; then
        read -r n rate tp tk < <(handshake_run "$CUSTODY_PROXY_ADDR" "$name.lab.test" 16 "$proxy_PID" "$keyd_PID")
        R[$name.proxy]=$(us_per "$tp" "$n")
        R[$name.total]=$(us_per $((tp + tk)) "$n")
        printf '%-5s %-8s %-20s %9s %8s %10s %10s %10s\n' "$round" "$name" custody-proxy "$n" "$rate" "${R[$name.proxy]}" "$(us_per "$tk" "$n")" "${R[$name.total]}"
        continue
      fi
      port=$(nginx_port "$kind")
      start_nginx "nginx-$kind-$name" "$port"
      read -r n rate tn < <(handshake_run "127.0.0.1:$port" "$name.lab.test" 16 "$nginx_PID")
      stop_nginx
      R[$name.$kind]=$(us_per "$tn" "$n")
      printf '%-5s %-8s %-20s %9s %8s %10s %10s %10s\n' "$round" "$name" "nginx-$kind" "$n" "$rate" "${R[$name.$kind]}" - "${R[$name.$kind]}"
    done
    RATIO[$name.file]+=" $(ratio "${R[$name.proxy]}" "${R[$name.file]}")"
    RATIO[$name.engine]+=" $(ratio "${R[$name.total]}" "${R[$name.engine]}")"
    RATIO[$name.matched]+=" $(ratio "${R[$name.proxy]}" "${R[$name.matched]}")"
    RATIO[$name.engine-matched]+=" $(ratio "${R[$name.total]}" "${R[$name.engine-matched]}")"
  done
done
echo
for name in ec256 rsa2048; do
  # shellcheck disable=SC2086
  echo "$name: proxy / nginx-file = $(median ${RATIO[$name.file]}) (rounds:${RATIO[$name.file]}; goal <= 0.9);" \
    "proxy+keyd / nginx-engine = $(median ${RATIO[$name.engine]}) (rounds:${RATIO[$name.engine]}; goal <= 1.0);" \
    "proxy / nginx-matched = $(median ${RATIO[$name.matched]}) (rounds:${RATIO[$name.matched]}; no goal);" \
    "proxy+keyd / nginx-engine-matched = $(median ${RATIO[$name.engine-matched]}) (rounds:${RATIO[$name.engine-matched]}; no goal)"
done
fi
if want 2; then
echo
echo "## 2. 5 ms injected key-service latency, 64 clients, ECDSA P-256, $ROUNDS rounds"
LAT_RATIOS=""
for round in $(seq 1 "$ROUNDS"); do
  read -r n0 rate0 _ < <(handshake_run "$CUSTODY_PROXY_ADDR" ec256.lab.test 64 "$proxy_PID")
  "$BIN/custodyctl" --identity admin testing set-fault --delay-ms 5 >/dev/null
  read -r n5 rate5 _ < <(handshake_run "$CUSTODY_PROXY_ADDR" ec256.lab.test 64 "$proxy_PID")
  "$BIN/custodyctl" --identity admin testing set-fault >/dev/null
  LAT_RATIOS+=" $(ratio "$rate5" "$rate0")"
  echo "round $round: without $rate0/s; with 5 ms $rate5/s; ratio $(ratio "$rate5" "$rate0")"
done
# shellcheck disable=SC2086
echo "with / without = $(median $LAT_RATIOS) (goal >= 0.9; a blocking worker caps at 200/s)"
fi
if want 3; then
echo
echo "## 3. Bulk relay (backend -> client), proxy CPU s/GB and MB/s"
# bulk_run ADDR CONC BYTES PID: prints "mb_per_s cpu_s_per_gb"
bulk_run() {
  local before after out
  before=$(cpu_ticks "$4")
  out=$(pin_client "$BIN/custody-bench-tls" bulk --connect "$1" --sni ec256.lab.test \
    --ca "$CUSTODY_CA" -c "$2" --bytes "$3")
  after=$(cpu_ticks "$4")
  awk -v mb="$(field mb_per_s "$out")" -v t=$((after - before)) -v hz="$TICK" -v b="$(field bytes "$out")" \
    'BEGIN { printf "%s %.3f\n", mb, (b > 0 ? t / hz / (b / 1e9) : 0) }'
}
# Both nginx set-ups run through the whole section, like the proxy.
start_nginx nginx-file-ec256 "$NGINX_FILE_PORT"
start_nginx nginx-matched-ec256 "$NGINX_MATCHED_PORT" nginxm
printf '%-5s %-16s %10s %10s %10s %10s %8s %8s %12s %8s\n' round load "proxy MB/s" "nginx MB/s" "proxy s/GB" "nginx s/GB" \
  "MB/s x" "s/GB x" "matched s/GB" "s/GB x"
for spec in "1 1073741824" "8 268435456"; do
  read -r conc bytes <<<"$spec"
  MBX=""
  GBX=""
  GBM=""
  for round in $(seq 1 "$ROUNDS"); do
    # shellcheck disable=SC2046
    for who in $(rotate "$round" proxy nginx matched); do
      case $who in
        proxy) read -r pm pc < <(bulk_run "$CUSTODY_PROXY_ADDR" "$conc" "$bytes" "$proxy_PID") ;;
        nginx) read -r nm nc < <(bulk_run "127.0.0.1:$NGINX_FILE_PORT" "$conc" "$bytes" "$nginx_PID") ;;
        matched) read -r _ mc < <(bulk_run "127.0.0.1:$NGINX_MATCHED_PORT" "$conc" "$bytes" "$nginxm_PID") ;;
      esac
    done
    MBX+=" $(ratio "$pm" "$nm")"
    GBX+=" $(ratio "$pc" "$nc")"
    GBM+=" $(ratio "$pc" "$mc")"
    printf '%-5s %-16s %10s %10s %10s %10s %8s %8s %12s %8s\n' "$round" "$conc x $((bytes >> 20)) MiB" "$pm" "$nm" "$pc" "$nc" \
      "$(ratio "$pm" "$nm")" "$(ratio "$pc" "$nc")" "$mc" "$(ratio "$pc" "$mc")"
  done
  # shellcheck disable=SC2086
  echo "$conc x $((bytes >> 20)) MiB: MB/s proxy / nginx = $(median $MBX); s/GB proxy / nginx = $(median $GBX);" \
    "s/GB proxy / nginx-matched = $(median $GBM) (no goal)"
done
stop_nginx
stop_nginx nginxm
echo "(goals: proxy s/GB <= 0.9 x nginx's, proxy MB/s >= nginx's)"
fi
if want 4; then
echo
echo "## 4. Added latency of a small keep-alive request (one connection each), $ROUNDS rounds of 5 x 1000 requests"
# Each round runs five blocks of 1000 requests against the backend directly, through the
# proxy and through nginx, in an order that rotates from block to block, so drift in the
# machine's load falls on all three alike. A percentile is taken over the samples of all
# rounds (a p99 of one round's 5000 rests on its 50 slowest requests, which one burst of load
# from elsewhere decides); each round's own figures are printed too.
lat() { # lat ADDR SAMPLES [--plain]
  pin_client "$BIN/custody-bench-tls" latency --connect "$1" --sni ec256.lab.test --ca "$CUSTODY_CA" \
    --requests 1000 --samples "$2" "${@:3}" >/dev/null
}
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
start_nginx nginx-file-ec256 "$NGINX_FILE_PORT"
mkdir -p "$TMP/lat"
: >"$TMP/lat/direct" && : >"$TMP/lat/proxy" && : >"$TMP/lat/nginx"
lat_figures() { # lat_figures LABEL SUFFIX: prints p50 and p99 of direct, proxy and nginx
  local q d p n
  for q in 50 99; do
    d=$(pct "$TMP/lat/direct${2:-}" $q)
    p=$(pct "$TMP/lat/proxy${2:-}" $q)
    n=$(pct "$TMP/lat/nginx${2:-}" $q)
    echo "$1 p$q: direct $d us; via proxy $p us (+$(add "$p" "$d")); via nginx $n us (+$(add "$n" "$d"));" \
      "added proxy / nginx = $(ratio "$(add "$p" "$d")" "$(add "$n" "$d")")"
  done
}
for round in $(seq 1 "$ROUNDS"); do
  : >"$TMP/lat/direct.r" && : >"$TMP/lat/proxy.r" && : >"$TMP/lat/nginx.r"
  for block in 0 1 2 3 4; do
    # shellcheck disable=SC2046
    for who in $(rotate $((block + round)) direct proxy nginx); do
      case $who in
        direct) lat "$CUSTODY_BACKEND_ADDR" "$TMP/lat/direct.r" --plain ;;
        proxy) lat "$CUSTODY_PROXY_ADDR" "$TMP/lat/proxy.r" ;;
        nginx) lat "127.0.0.1:$NGINX_FILE_PORT" "$TMP/lat/nginx.r" ;;
      esac
    done
  done
  for who in direct proxy nginx; do cat "$TMP/lat/$who.r" >>"$TMP/lat/$who"; done
  lat_figures "round $round" .r
done
stop_nginx
echo
lat_figures "all $((ROUNDS * 5000)) requests each,"
echo "(goal: added latency proxy / nginx <= 1.0 at p50 and p99)"
fi
if want 5; then
echo
echo "## 5. Latency of a small keep-alive request while 8 downloads run on the same worker, $ROUNDS rounds of 300 requests"
# The price of a busy transfer for everyone else on its worker (what limits.relay_turn_bytes
# trades against CPU per byte): eight 1 GiB downloads through the server, and once they flow,
# a small request at a time on a connection of its own. The requests' client runs at real-time
# priority where it may and the downloads' client at nice 19, so that CPU 1's queue (the
# backend serves both) adds little to what the server decides. The downloads stop when the
# requests are done. No goal.
RT=()
if chrt -f 10 true 2>/dev/null; then RT=(chrt -f 10); fi
mkdir -p "$TMP/busy"
: >"$TMP/busy/proxy" && : >"$TMP/busy/nginx"
busy_lat() { # busy_lat ADDR SAMPLES
  nice -n 19 taskset -c "$CLIENT_CPU" "$BIN/custody-bench-tls" bulk --connect "$1" --sni ec256.lab.test \
    --ca "$CUSTODY_CA" -c 8 --bytes 1073741824 >/dev/null 2>&1 &
  local bulk=$!
  sleep 0.5
  "${RT[@]}" taskset -c "$CLIENT_CPU" "$BIN/custody-bench-tls" latency --connect "$1" --sni ec256.lab.test \
    --ca "$CUSTODY_CA" --requests 300 --samples "$2" >/dev/null
  kill "$bulk" 2>/dev/null || true
  wait "$bulk" 2>/dev/null || true
}
start_nginx nginx-file-ec256 "$NGINX_FILE_PORT"
printf '%-5s %14s %14s %14s %14s\n' round "proxy p50 us" "nginx p50 us" "proxy p99 us" "nginx p99 us"
for round in $(seq 1 "$ROUNDS"); do
  : >"$TMP/busy/proxy.r" && : >"$TMP/busy/nginx.r"
  # shellcheck disable=SC2046
  for who in $(rotate "$round" proxy nginx); do
    case $who in
      proxy) busy_lat "$CUSTODY_PROXY_ADDR" "$TMP/busy/proxy.r" ;;
      nginx) busy_lat "127.0.0.1:$NGINX_FILE_PORT" "$TMP/busy/nginx.r" ;;
    esac
  done
  for who in proxy nginx; do cat "$TMP/busy/$who.r" >>"$TMP/busy/$who"; done
  printf '%-5s %14s %14s %14s %14s\n' "$round" "$(pct "$TMP/busy/proxy.r" 50)" "$(pct "$TMP/busy/nginx.r" 50)" \
    "$(pct "$TMP/busy/proxy.r" 99)" "$(pct "$TMP/busy/nginx.r" 99)"
done
stop_nginx
for q in 50 99; do
  p=$(pct "$TMP/busy/proxy" $q)
  n=$(pct "$TMP/busy/nginx" $q)
  echo "all $((ROUNDS * 300)) requests each, p$q: via proxy $p us, via nginx $n us; proxy / nginx = $(ratio "$p" "$n") (no goal)"
done
[ ${#RT[@]} -gt 0 ] || echo "(the requests' client could not take real-time priority: it also waited for CPU 1)"
fi
