# shellcheck shell=bash
# shellcheck disable=SC2034 # variables are for the scripts that source this file
# tests/e2e/lib.sh - shared helpers of the end-to-end shell tests. Source it from bash:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   e2e_setup            # temp dir + SoftHSM2 lab + custody-keyd (test hooks on), ready
#   expect_rc 0 "$CTL" health
#   ...
#   e2e_finish           # prints "N passed, 0 failed", exits 0
#
# Every check prints one line ("ok N - ..."). A failing check (fail, expect_*, check) prints
# what it saw and exits 1; the EXIT trap then prints "N passed, 1 failed", stops keyd
# (SIGTERM, SIGKILL after 5 s) and removes the temp dir - also on INT/TERM/PIPE and on an
# unexpected command failure under set -e. soft_check counts a failure and goes on;
# e2e_finish then prints "N passed, M failed" and exits 1.
#
# Environment: CUSTODY_BIN_DIR (default <repo>/build/bin), TMPDIR (default /tmp),
# E2E_KEEP=1 keeps the temp dir for a post-mortem.

set -Eeuo pipefail

E2E_LIB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
E2E_REPO=$(cd -- "$E2E_LIB_DIR/../.." && pwd)
CUSTODY_BIN_DIR=${CUSTODY_BIN_DIR:-$E2E_REPO/build/bin}
KEYD="$CUSTODY_BIN_DIR/custody-keyd"
CTL="$CUSTODY_BIN_DIR/custodyctl"
PROXY="$CUSTODY_BIN_DIR/custody-proxy"
BACKEND="$CUSTODY_BIN_DIR/custody-lab-backend"
LAB_SH="$E2E_REPO/hsm/lab.sh"

E2E_NAME=${E2E_NAME:-$(basename -- "${0%.sh}")}
E2E_TMP=          # temp dir of this run
KEYD_PID=         # pid of the custody-keyd we started (empty once stopped)
KEYD_RC=          # its exit status once stopped by e2e_stop_keyd
PROXY_PID=        # pid of the custody-proxy we started (empty once stopped)
PROXY_RC=         # its exit status once stopped by e2e_stop_proxy
BACKEND_PID=      # pid of the custody-lab-backend we started
E2E_PASSED=0
E2E_FAILED=0
E2E_DONE=0
# Output of the last command run by expect_rc / expect_stderr_contains / run_capture.
E2E_OUT=
E2E_ERR=
E2E_RC=

# ---------------------------------------------------------------- reporting
pass() {
  E2E_PASSED=$((E2E_PASSED + 1))
  printf 'ok %d - %s\n' "$E2E_PASSED" "$*"
}

fail() {
  E2E_FAILED=$((E2E_FAILED + 1))
  printf 'FAIL - %s\n' "$*"
  exit 1
}

# A command line shortened for check lines: binaries by base name, at most 140 chars.
_e2e_cmdline() {
  local out='' a
  for a in "$@"; do
    case "$a" in
      "$CUSTODY_BIN_DIR"/*) a=${a##*/} ;;
      "${E2E_TMP:-/nonexistent}"/*) a="\$T/${a#"$E2E_TMP"/}" ;;
    esac
    [[ "$a" == *[[:space:]]* ]] && a="'$a'"
    out+="${out:+ }$a"
  done
  ((${#out} <= 140)) || out="${out:0:137}..."
  printf '%s' "$out"
}

_e2e_show_output() {
  if [[ -s "$E2E_OUT" ]]; then
    echo "  --- stdout:"
    head -c 4000 -- "$E2E_OUT" | sed 's/^/  | /'
  fi
  if [[ -s "$E2E_ERR" ]]; then
    echo "  --- stderr:"
    head -c 4000 -- "$E2E_ERR" | sed 's/^/  | /'
  fi
}

# run_capture CMD...: run CMD with stdout/stderr in $E2E_OUT/$E2E_ERR and its status in
# $E2E_RC; never fails by itself.
run_capture() {
  E2E_OUT="$E2E_TMP/last.out"
  E2E_ERR="$E2E_TMP/last.err"
  E2E_RC=0
  "$@" >"$E2E_OUT" 2>"$E2E_ERR" </dev/null || E2E_RC=$?
}

# expect_rc WANT CMD...: run CMD, compare its exit status with WANT.
expect_rc() {
  local want=$1
  shift
  run_capture "$@"
  if [[ "$E2E_RC" != "$want" ]]; then
    _e2e_show_output
    fail "exit $E2E_RC, want $want: $(_e2e_cmdline "$@")"
  fi
  pass "exit $want: $(_e2e_cmdline "$@")"
}

# expect_stderr_contains TEXT CMD...: run CMD (any exit status), its stderr must contain TEXT.
expect_stderr_contains() {
  local text=$1
  shift
  run_capture "$@"
  if ! grep -qF -- "$text" "$E2E_ERR"; then
    _e2e_show_output
    fail "stderr lacks '$text' (exit $E2E_RC): $(_e2e_cmdline "$@")"
  fi
  pass "stderr has '$text': $(_e2e_cmdline "$@")"
}

# expect_rpc_error CODE CMD...: custodyctl CMD exits 1 with "custodyctl: CODE:" on stderr.
expect_rpc_error() {
  local code=$1
  shift
  run_capture "$@"
  if [[ "$E2E_RC" != 1 ]] || ! grep -q -- "^custodyctl: $code: " "$E2E_ERR"; then
    _e2e_show_output
    fail "want exit 1 and 'custodyctl: $code: ...', got exit $E2E_RC: $(_e2e_cmdline "$@")"
  fi
  pass "$code (exit 1): $(_e2e_cmdline "$@")"
}

# check DESCRIPTION CMD...: a check whose success is CMD's exit status 0 (CMD's output is
# shown only when it fails).
check() {
  local what=$1
  shift
  if "$@" >"$E2E_TMP/check.out" 2>&1; then
    pass "$what"
  else
    sed 's/^/  | /' "$E2E_TMP/check.out"
    fail "$what"
  fi
}

# soft_check DESCRIPTION CMD...: like check, but a failure is counted and the test goes on
# (for independent checks whose failure should not hide the ones after it); e2e_finish then
# exits 1.
soft_check() {
  local what=$1
  shift
  if "$@" >"$E2E_TMP/check.out" 2>&1; then
    pass "$what"
  else
    sed 's/^/  | /' "$E2E_TMP/check.out"
    E2E_FAILED=$((E2E_FAILED + 1))
    printf 'FAIL - %s\n' "$what"
  fi
}

# file_contains FILE TEXT / file_lacks FILE TEXT (fixed strings).
file_contains() { grep -qF -- "$2" "$1"; }
file_lacks() { ! grep -qiF -- "$2" "$1"; }

# ---------------------------------------------------------------- keyd
# e2e_start_keyd [EXTRA ARGS...]: start custody-keyd on the lab config (test hooks on), log
# in $E2E_TMP/keyd.log, and wait until `custodyctl health` says SERVING.
e2e_start_keyd() {
  [[ -z "$KEYD_PID" ]] || fail "e2e_start_keyd: keyd already running (pid $KEYD_PID)"
  "$KEYD" --config "$CUSTODY_KEYD_CONFIG" --enable-test-hooks "$@" \
    >>"$E2E_TMP/keyd.log" 2>&1 </dev/null &
  KEYD_PID=$!
  KEYD_RC=
  local deadline=$((SECONDS + 20)) rc
  while :; do
    if "$CTL" --timeout-ms 1000 health >"$E2E_TMP/health.out" 2>&1; then
      break
    fi
    if ! kill -0 "$KEYD_PID" 2>/dev/null; then
      rc=0
      wait "$KEYD_PID" || rc=$?
      KEYD_PID=
      echo "custody-keyd exited with status $rc before serving; its log:"
      sed 's/^/  | /' "$E2E_TMP/keyd.log"
      fail "custody-keyd did not start"
    fi
    if ((SECONDS >= deadline)); then
      echo "custody-keyd not SERVING after 20 s; last health check:"
      sed 's/^/  | /' "$E2E_TMP/health.out"
      echo "its log:"
      sed 's/^/  | /' "$E2E_TMP/keyd.log"
      fail "custody-keyd did not become ready"
    fi
    sleep 0.1
  done
  pass "custody-keyd (pid $KEYD_PID) SERVING on $CUSTODY_KEYD_ADDR"
}

# _e2e_stop NAME PID SIGNAL SECONDS: send SIGNAL to PID, wait up to SECONDS, then SIGKILL.
# Sets E2E_STOP_RC to its exit status (128+N when killed by signal N). Runs in the main shell
# (wait only knows this shell's children).
_e2e_stop() {
  local name=$1 pid=$2 sig=$3 secs=$4 i
  kill -s "$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (pid $pid) still alive $secs s after SIG$sig: SIGKILL"
    kill -s KILL "$pid" 2>/dev/null || true
  fi
  E2E_STOP_RC=0
  wait "$pid" 2>/dev/null || E2E_STOP_RC=$?
}

# e2e_stop_keyd [SIGNAL]: send SIGNAL (default TERM), wait up to 5 s, then SIGKILL.
# Sets KEYD_RC to keyd's exit status (128+N when killed by signal N). No-op if not running.
e2e_stop_keyd() {
  [[ -n "$KEYD_PID" ]] || return 0
  _e2e_stop custody-keyd "$KEYD_PID" "${1:-TERM}" 5
  KEYD_RC=$E2E_STOP_RC
  KEYD_PID=
}

# e2e_kill_keyd_under_proxy: with the proxy up in front of the echo backend, kill keyd (SIGKILL)
# while a client holds an established connection; check that the connection relays 1 MiB byte
# for byte, and that a new handshake ends with a TLS alert instead of hanging. keyd stays down.
e2e_kill_keyd_under_proxy() {
  local line
  coproc HOLD { python3 "$E2E_LIB_DIR/proxy_client.py" keyd-down "$CUSTODY_PROXY_ADDR" "$CUSTODY_CA" 2>&1; }
  read -r -t 30 line <&"${HOLD[0]}" || fail "keyd-down client did not open its connection"
  check "established connection open before keyd dies" test "$line" = open
  e2e_stop_keyd KILL
  pass "custody-keyd killed (SIGKILL)"
  echo go >&"${HOLD[1]}"
  read -r -t 60 line <&"${HOLD[0]}" || fail "keyd-down client gave no verdict"
  check "keyd down: an established connection relays 1 MiB byte for byte" \
    test "$line" = "ok: established connection relayed 1 MiB byte for byte with keyd down"
  wait "$HOLD_PID" 2>/dev/null || true
  # New handshakes fail with an alert within the signing deadline: timeout(1) would say 124.
  run_capture timeout 20 openssl s_client -connect "$CUSTODY_PROXY_ADDR" -CAfile "$CUSTODY_CA" \
    -servername ec256.lab.test </dev/null
  check "keyd down: s_client did not hang (status $E2E_RC)" test "$E2E_RC" -ne 124
  check "keyd down: the handshake ended with a TLS alert" grep -q "alert" "$E2E_ERR"
}

# wait_tcp HOST:PORT SECONDS: poll until something accepts on HOST:PORT.
wait_tcp() {
  python3 - "$1" "$2" <<'EOF'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
EOF
}

# e2e_start_backend [MODE] [ADDR]: custody-lab-backend (http or echo) on ADDR (default
# $CUSTODY_BACKEND_ADDR), ready when it accepts.
e2e_start_backend() {
  local mode=${1:-http} addr=${2:-$CUSTODY_BACKEND_ADDR}
  [[ -z "$BACKEND_PID" ]] || fail "e2e_start_backend: a backend is already running"
  "$BACKEND" --listen "$addr" --mode "$mode" >>"$E2E_TMP/backend.log" 2>&1 </dev/null &
  BACKEND_PID=$!
  wait_tcp "$addr" 10 || fail "custody-lab-backend did not listen on $addr"
}

e2e_stop_backend() {
  [[ -n "$BACKEND_PID" ]] || return 0
  kill -s KILL "$BACKEND_PID" 2>/dev/null || true
  wait "$BACKEND_PID" 2>/dev/null || true
  BACKEND_PID=
}

# e2e_start_proxy [CONFIG] [EXTRA ARGS...]: custody-proxy, ready when its metrics endpoint
# (the config's metrics.listen, $CUSTODY_PROXY_METRICS_ADDR in the lab's) answers. Its log is
# $E2E_TMP/proxy.log.
e2e_start_proxy() {
  local config=${1:-$CUSTODY_PROXY_CONFIG}
  shift || true
  [[ -z "$PROXY_PID" ]] || fail "e2e_start_proxy: a proxy is already running"
  "$PROXY" --config "$config" "$@" >>"$E2E_TMP/proxy.log" 2>&1 </dev/null &
  PROXY_PID=$!
  PROXY_RC=
  local deadline=$((SECONDS + 20)) rc
  until curl -sf -o /dev/null "http://$CUSTODY_PROXY_METRICS_ADDR/metrics"; do
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
      rc=0
      wait "$PROXY_PID" || rc=$?
      PROXY_PID=
      echo "custody-proxy exited with status $rc before serving; its log:"
      sed 's/^/  | /' "$E2E_TMP/proxy.log"
      fail "custody-proxy did not start"
    fi
    ((SECONDS < deadline)) || fail "custody-proxy not ready after 20 s"
    sleep 0.05
  done
}

# e2e_stop_proxy [SIGNAL] [SECONDS]: signal (default TERM), wait (default 15 s), then SIGKILL.
# Sets PROXY_RC.
e2e_stop_proxy() {
  [[ -n "$PROXY_PID" ]] || return 0
  _e2e_stop custody-proxy "$PROXY_PID" "${1:-TERM}" "${2:-15}"
  PROXY_RC=$E2E_STOP_RC
  PROXY_PID=
}

# proxy_metric NAME_AND_LABELS: the value of one series on the proxy's metrics endpoint (0 if
# absent), e.g. proxy_metric 'custody_proxy_handshakes_total{listener="lab",outcome="ok"}'.
proxy_metric() {
  curl -sf "http://$CUSTODY_PROXY_METRICS_ADDR/metrics" |
    awk -v k="$1" '$1 == k { v = $2 } END { print (v == "" ? 0 : v + 0) }'
}

# ---------------------------------------------------------------- set-up / tear-down
_e2e_on_exit() {
  local rc=$?
  set +eE
  trap - ERR
  trap '' INT TERM PIPE # clean up no matter what; stdout may be a closed pipe
  e2e_stop_proxy KILL 5
  e2e_stop_backend
  e2e_stop_keyd TERM
  if ((!E2E_DONE)); then
    ((rc != 0)) || rc=1
    ((E2E_FAILED > 0)) || E2E_FAILED=1 # stopped by an unexpected error, not by fail
    if [[ -n "$E2E_TMP" && -s "$E2E_TMP/keyd.log" ]]; then
      echo "--- last lines of the keyd log:"
      tail -n 20 -- "$E2E_TMP/keyd.log" | sed 's/^/  | /'
    fi
    if [[ -n "$E2E_TMP" && -s "$E2E_TMP/proxy.log" ]]; then
      echo "--- last lines of the proxy log:"
      tail -n 30 -- "$E2E_TMP/proxy.log" | sed 's/^/  | /'
    fi
    echo "$E2E_PASSED passed, $E2E_FAILED failed"
  fi
  if [[ -n "$E2E_TMP" && -d "$E2E_TMP" ]]; then
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then
      echo "(kept $E2E_TMP)"
    else
      rm -rf -- "$E2E_TMP"
    fi
  fi
  exit "$rc"
}

_e2e_on_err() {
  local rc=$1 line=$2 cmd=$3
  # Only the main shell: a failing command inside $(...) is the caller's business.
  ((BASH_SUBSHELL == 0)) || return 0
  echo "FAIL - unexpected failure (exit $rc) at ${BASH_SOURCE[1]##*/}:$line: $cmd"
}

# e2e_init: temp dir and traps only (no lab). e2e_lab: a lab in $E2E_TMP/lab, lab.env sourced.
e2e_init() {
  local b
  for b in "$KEYD" "$CTL"; do
    [[ -x "$b" ]] || { echo "missing binary: $b (set CUSTODY_BIN_DIR)"; exit 1; }
  done
  for b in openssl python3 curl; do
    command -v "$b" >/dev/null || { echo "missing tool: $b"; exit 1; }
  done
  trap _e2e_on_exit EXIT
  trap 'echo "FAIL - interrupted by SIGINT"; exit 130' INT
  trap 'echo "FAIL - interrupted by SIGTERM"; exit 143' TERM
  trap 'exit 141' PIPE # our stdout went away (e.g. `| head`): still clean up
  trap '_e2e_on_err $? $LINENO "$BASH_COMMAND"' ERR
  E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/custody-e2e.XXXXXX")
  E2E_OUT="$E2E_TMP/last.out"
  E2E_ERR="$E2E_TMP/last.err"
  echo "# $E2E_NAME: temp dir $E2E_TMP, binaries in $CUSTODY_BIN_DIR"
}

e2e_lab() {
  if ! "$LAB_SH" init "$E2E_TMP/lab" >"$E2E_TMP/lab.log" 2>&1; then
    sed 's/^/  | /' "$E2E_TMP/lab.log"
    fail "hsm/lab.sh init"
  fi
  # shellcheck disable=SC1091
  source "$E2E_TMP/lab/lab.env"
  # Never pick up a caller's CUSTODY_IDENTITY: each command names its identity.
  unset CUSTODY_IDENTITY
  pass "lab built in \$T/lab (keyd on $CUSTODY_KEYD_ADDR)"
}

e2e_setup() { # [EXTRA KEYD ARGS...]
  e2e_init
  e2e_lab
  e2e_start_keyd "$@"
}

e2e_finish() {
  e2e_stop_proxy TERM
  e2e_stop_backend
  e2e_stop_keyd TERM
  E2E_DONE=1
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  ((E2E_FAILED == 0)) || exit 1
  exit 0
}

# ---------------------------------------------------------------- small utilities
# random_file PATH BYTES
random_file() { head -c "$2" /dev/urandom >"$1"; }

# hexof FILE: lowercase hex of a file's bytes, one line.
hexof() { od -An -v -tx1 -- "$1" | tr -d ' \n'; }

# pubder FILE.pem OUT.der: a PEM public key as DER (normalised).
pubder() { openssl pkey -pubin -in "$1" -outform DER -out "$2" 2>/dev/null; }

# cert_pub NAME OUT.pem: public key of the lab certificate of key NAME.
cert_pub() { openssl x509 -pubkey -noout -in "$CUSTODY_LAB_DIR/certs/$1.crt" >"$2"; }
