#!/usr/bin/env bash
# tests/e2e/config_errors.sh - custody-keyd's configuration checks: each broken copy of the
# lab's keyd.yaml is refused by --check-config with exit 2 and a message naming the field; the
# valid file (YAML or JSON) passes; a PIN file or TLS key readable by others stops keyd at
# start-up with a message saying how to fix it. Needs a lab (for valid paths), not a running keyd.
# shellcheck disable=SC2119,SC2317 # e2e_setup takes no script arguments; helpers run via check
# shellcheck source=tests/e2e/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

e2e_init
e2e_lab
T=$E2E_TMP
W="$T/work"
mkdir -p -- "$W"
Y=$CUSTODY_KEYD_CONFIG

# ------------------------------------------------------------ valid files
expect_rc 0 "$KEYD" --config "$Y" --check-config
check "the lab's keyd.yaml: configuration OK" file_contains "$E2E_OUT" "configuration OK"

# The same configuration as JSON (built from lab.env, not converted by a YAML library).
python3 - "$W/keyd.json" <<'PY'
import json, os, sys
e = os.environ
cfg = {
    "listen": e["CUSTODY_KEYD_ADDR"],
    "tls": {"cert_file": e["CUSTODY_KEYD_CERT"], "key_file": e["CUSTODY_KEYD_KEY"],
            "client_ca_file": e["CUSTODY_CA"]},
    "hsm": {"module": e["CUSTODY_PKCS11_MODULE"], "token_label": e["CUSTODY_TOKEN_LABEL"],
            "pin_file": e["CUSTODY_PIN_FILE"], "sessions": 8},
    "audit": {"path": e["CUSTODY_AUDIT_LOG"]},
    "metrics": {"listen": e["CUSTODY_KEYD_METRICS_ADDR"]},
    "limits": {"sign_timeout_ms": 2000, "max_message_bytes": 65536},
    "policy": [
        {"identity": "proxy", "sign": ["lab-ec256", "lab-ec384", "lab-rsa2048", "lab-ed25519"]},
        {"identity": "admin", "read": ["*"], "admin": True},
        {"identity": "intruder"},
    ],
}
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PY
expect_rc 0 "$KEYD" --config "$W/keyd.json" --check-config
check "keyd.json: configuration OK" file_contains "$E2E_OUT" "configuration OK"

# ------------------------------------------------------------ broken copies
# mutate NAME PYTHON-EXPR: $W/NAME = the lab's keyd.yaml transformed by the expression over
# `s` (the text); fails if the expression changed nothing.
mutate() {
  python3 - "$Y" "$W/$1" "$2" <<'PY'
import sys
src, dst, expr = sys.argv[1:4]
s = open(src).read()
out = eval(expr, {"s": s})
if out == s:
    sys.exit(f"mutation changed nothing: {expr}")
open(dst, "w").write(out)
PY
}

# refused FILE FIELD [MORE-TEXT]: --check-config exits 2 and names FIELD.
refused() {
  local file=$1 field=$2 more=${3:-}
  expect_rc 2 "$KEYD" --config "$W/$file" --check-config
  check "$file: message is 'custody-keyd: invalid configuration: ...'" \
    grep -q "^custody-keyd: invalid configuration: " "$E2E_ERR"
  check "$file: message names '$field'" file_contains "$E2E_ERR" "$field"
  if [[ -n "$more" ]]; then
    check "$file: message says '$more'" file_contains "$E2E_ERR" "$more"
  fi
  check "$file: nothing on stdout" test ! -s "$E2E_OUT"
}

mutate listn.yaml 's.replace("\nlisten:", "\nlistn:", 1)'
refused listn.yaml "field 'listn'" "unknown field"
check "listn.yaml: message gives FILE:LINE" grep -q "listn.yaml:[0-9][0-9]*: " "$E2E_ERR"

mutate cert_fil.yaml 's.replace("  cert_file:", "  cert_fil:", 1)'
refused cert_fil.yaml "field 'tls.cert_fil'" "unknown field"
check "cert_fil.yaml: message gives FILE:LINE" grep -q "cert_fil.yaml:[0-9][0-9]*: " "$E2E_ERR"

mutate signn.yaml 's.replace("    sign: [", "    signn: [", 1)'
refused signn.yaml "policy[0].signn" "unknown field"

mutate sessions_many.yaml 's.replace("sessions: 8", "sessions: many", 1)'
refused sessions_many.yaml "field 'hsm.sessions'" "many"

mutate sessions_1000.yaml 's.replace("sessions: 8", "sessions: 1000", 1)'
refused sessions_1000.yaml "field 'hsm.sessions'" "256"

mutate sessions_257.yaml 's.replace("sessions: 8", "sessions: 257", 1)'
refused sessions_257.yaml "field 'hsm.sessions'" "256"
mutate sessions_256.yaml 's.replace("sessions: 8", "sessions: 256", 1)'
expect_rc 0 "$KEYD" --config "$W/sessions_256.yaml" --check-config

mutate max_message.yaml 's.replace("max_message_bytes: 65536", "max_message_bytes: 2000000", 1)'
refused max_message.yaml "field 'limits.max_message_bytes'" "1048576"

pin=$CUSTODY_PIN_FILE
mutate pin_missing.yaml "s.replace('$pin', '$W/no-such-dir/pin', 1)"
refused pin_missing.yaml "field 'hsm.pin_file'" "$W/no-such-dir/pin"

mutate metrics_public.yaml "s.replace('\"$CUSTODY_KEYD_METRICS_ADDR\"', '\"0.0.0.0:9\"', 1)"
refused metrics_public.yaml "field 'metrics.listen'" "loopback"

mutate dup_identity.yaml 's + "  - identity: \"proxy\"\n    sign: [\"lab-ec256\"]\n"'
refused dup_identity.yaml "identity" "'proxy'"
check "dup_identity.yaml: message names the policy" file_contains "$E2E_ERR" "policy["

mutate bad_yaml.yaml 's.replace("tls:\n", "tls: [unclosed\n", 1)'
refused bad_yaml.yaml "bad_yaml.yaml:" "not valid YAML"

mutate admin_yes.yaml 's.replace("admin: true", "admin: maybe", 1)'
refused admin_yes.yaml "field 'policy[1].admin'"

printf '{"listn": "%s"}\n' "$CUSTODY_KEYD_ADDR" >"$W/listn.json"
refused listn.json "listn"

: >"$W/empty.yaml"
refused empty.yaml "listen" "required"

# A key given twice is an error, not "the last one wins" (YAML 1.2: keys are unique; a
# silently ignored line in a security configuration is a trap).
# shellcheck disable=SC2016
refused_soft() { # FILE FIELD: like refused, but counted and continued on failure
  run_capture "$KEYD" --config "$W/$1" --check-config
  soft_check "$1: --check-config exits 2 naming '$2' (got exit $E2E_RC: $(cat "$E2E_OUT" "$E2E_ERR" | head -c 200 | tr '\n' ' '))" \
    bash -c '[[ "$1" == 2 ]] && grep -qF -- "$3" "$2"' _ "$E2E_RC" "$E2E_ERR" "$2"
}
mutate dup_key.yaml 's.replace("  sessions: 8\n", "  sessions: 8\n  sessions: 9\n", 1)'
refused_soft dup_key.yaml "hsm.sessions"
mutate dup_listen.yaml "s.replace('\nlisten:', '\nlisten: \"127.0.0.1:1\"\nlisten:', 1)"
refused_soft dup_listen.yaml "listen"

# ------------------------------------------------------------ secrets readable by others
# shellcheck disable=SC2016 # bash -c scripts take their arguments as $1...
# keyd must refuse to START (this is checked when it opens the files, not by --check-config):
# run it for real, bounded by `timeout 10` (exit 124 would mean it started serving).
start_refused() { # NAME CONFIG SECRET-PATH
  local name=$1 cfg=$2 secret=$3
  run_capture timeout 10 "$KEYD" --config "$cfg"
  check "$name: keyd refuses to start (exit $E2E_RC, not 0 and not 124 = still running)" \
    test "$E2E_RC" != 0 -a "$E2E_RC" != 124
  check "$name: the message says 'chmod 600 $secret'" \
    bash -c 'cat "$1" "$2" | grep -qF "chmod 600 $3"' _ "$E2E_OUT" "$E2E_ERR" "$secret"
  check "$name: keyd never served" \
    bash -c '! cat "$1" "$2" | grep -q "serving custody.v1.KeyService"' _ "$E2E_OUT" "$E2E_ERR"
}

cp -- "$CUSTODY_PIN_FILE" "$W/pin644"
chmod 644 "$W/pin644"
mutate pin644.yaml "s.replace('$pin', '$W/pin644', 1)"
start_refused "PIN file mode 0644" "$W/pin644.yaml" "$W/pin644"
chmod 640 "$W/pin644"
start_refused "PIN file mode 0640" "$W/pin644.yaml" "$W/pin644"

cp -- "$CUSTODY_KEYD_KEY" "$W/keyd644.key"
chmod 644 "$W/keyd644.key"
mutate key644.yaml "s.replace('$CUSTODY_KEYD_KEY', '$W/keyd644.key', 1)"
start_refused "TLS key mode 0644" "$W/key644.yaml" "$W/keyd644.key"

e2e_finish
