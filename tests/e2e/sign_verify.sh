#!/usr/bin/env bash
# tests/e2e/sign_verify.sh - every served key signs with every scheme it allows, through
# custody-keyd and custodyctl; OpenSSL verifies each signature against the public key of the
# key's CERTIFICATE. Also: the key service publishes the same public key; every signature has
# exactly one audit record, and the audit log holds no digest, signature or PIN; the hash chain
# verifies and a tampered copy does not.
# shellcheck disable=SC2119,SC2317 # e2e_setup takes no script arguments; helpers run via check
# shellcheck source=tests/e2e/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

e2e_setup
T=$E2E_TMP
W="$T/work"
mkdir -p -- "$W"

declare -A SCHEMES=(
  [lab-ec256]="ecdsa_secp256r1_sha256 ecdsa_secp384r1_sha384 ecdsa_secp521r1_sha512"
  [lab-ec384]="ecdsa_secp256r1_sha256 ecdsa_secp384r1_sha384 ecdsa_secp521r1_sha512"
  [lab-rsa2048]="rsa_pss_rsae_sha256 rsa_pss_rsae_sha384 rsa_pss_rsae_sha512 rsa_pkcs1_sha256 rsa_pkcs1_sha384 rsa_pkcs1_sha512"
  [lab-ed25519]="ed25519"
)
KEYS=(lab-ec256 lab-ec384 lab-rsa2048 lab-ed25519)

# ------------------------------------------------------------ published public keys
for key in "${KEYS[@]}"; do
  cert_pub "$key" "$W/$key.cert.pub.pem"
  pubder "$W/$key.cert.pub.pem" "$W/$key.cert.pub.der"
  expect_rc 0 "$CTL" --identity proxy -o json keys show "$key"
  cp -- "$E2E_OUT" "$W/$key.show.json"
  python3 - "$W/$key.show.json" "$W/$key.show" <<'PY'
import base64, json, sys
k = json.load(open(sys.argv[1]))
v = [v for v in k["versions"] if v["version"] == k["active_version"]][0]
open(sys.argv[2] + ".pub.pem", "w").write(v["public_key_pem"])
open(sys.argv[2] + ".pub.der", "wb").write(base64.b64decode(v["public_key_der"]))
open(sys.argv[2] + ".chain.pem", "w").write(v["certificate_chain_pem"])
PY
  pubder "$W/$key.show.pub.pem" "$W/$key.show.pem.der"
  check "$key: keys show public_key_pem == certificate public key" \
    cmp -s -- "$W/$key.show.pem.der" "$W/$key.cert.pub.der"
  check "$key: keys show public_key_der == certificate public key" \
    cmp -s -- "$W/$key.show.pub.der" "$W/$key.cert.pub.der"
  openssl x509 -in "$W/$key.show.chain.pem" -outform DER -out "$W/$key.show.leaf.der"
  openssl x509 -in "$CUSTODY_LAB_DIR/certs/$key.crt" -outform DER -out "$W/$key.lab.leaf.der"
  check "$key: keys show certificate == certs/$key.crt" \
    cmp -s -- "$W/$key.show.leaf.der" "$W/$key.lab.leaf.der"
done

# ------------------------------------------------------------ sign + verify
hash_of() { # scheme -> sha256|sha384|sha512|none
  case "$1" in
    *sha256) echo sha256 ;;
    *sha384) echo sha384 ;;
    *sha512) echo sha512 ;;
    ed25519) echo none ;;
    *) fail "no hash for scheme $1" ;;
  esac
}

# verify SCHEME PUB.pem MSG SIG: exit status of OpenSSL's verification.
verify() {
  local scheme=$1 pub=$2 msg=$3 sig=$4 h
  h=$(hash_of "$scheme")
  case "$scheme" in
    ed25519)
      openssl pkeyutl -verify -pubin -inkey "$pub" -rawin -in "$msg" -sigfile "$sig" ;;
    rsa_pss_*)
      openssl dgst "-$h" -verify "$pub" -sigopt rsa_padding_mode:pss \
        -sigopt rsa_pss_saltlen:digest -signature "$sig" "$msg" ;;
    *)
      openssl dgst "-$h" -verify "$pub" -signature "$sig" "$msg" ;;
  esac
}
verifies() { verify "$@" >"$T/verify.out" 2>&1 && grep -q "Verified OK\|Signature Verified Successfully" "$T/verify.out"; }
does_not_verify() {
  local rc=0
  verify "$@" >"$T/verify.out" 2>&1 || rc=$?
  # A refusal, not a usage error: openssl dgst prints "Verification Failure", pkeyutl
  # "Signature Verification Failure", both exit 1.
  ((rc == 1)) && grep -qi "Verification Failure" "$T/verify.out"
}

SIGNED=() # "request_id key scheme version msgfile sigfile" of every successful signature
n=0
for key in "${KEYS[@]}"; do
  pub="$W/$key.cert.pub.pem"
  for scheme in ${SCHEMES[$key]}; do
    n=$((n + 1))
    msg="$W/msg.$n"
    sig="$W/sig.$n"
    random_file "$msg" $((1 + RANDOM % 4096))
    expect_rc 0 "$CTL" --identity proxy -o json sign --key "$key" --scheme "$scheme" \
      --in "$msg" --out "$sig"
    read -r rid ver okey oscheme < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["request_id"], r["version"], r["key"], r["scheme"])' "$E2E_OUT")
    [[ "$okey" == "$key" && "$oscheme" == "$scheme" && "$ver" == 1 ]] ||
      fail "$key/$scheme: sign output names key=$okey scheme=$oscheme version=$ver"
    [[ -s "$sig" ]] || fail "$key/$scheme: empty signature file"
    check "$key/$scheme: OpenSSL verifies the signature against the certificate key" \
      verifies "$scheme" "$pub" "$msg" "$sig"
    SIGNED+=("$rid $key $scheme $ver $msg $sig")
  done
done

# A tampered message does not verify (one per key type; RSA for both paddings).
tamper() { # IN OUT: same bytes, first byte flipped
  python3 -c '
import sys
b = bytearray(open(sys.argv[1], "rb").read())
b[0] ^= 0x01
open(sys.argv[2], "wb").write(bytes(b))' "$1" "$2"
}
declare -A TAMPER_DONE=()
for rec in "${SIGNED[@]}"; do
  read -r rid key scheme ver msg sig <<<"$rec"
  case "$scheme" in
    ecdsa_*) kind=ecdsa ;; rsa_pss_*) kind=rsa-pss ;; rsa_pkcs1_*) kind=rsa-pkcs1 ;; *) kind=$scheme ;;
  esac
  [[ -z "${TAMPER_DONE[$kind]:-}" ]] || continue
  TAMPER_DONE[$kind]=1
  tamper "$msg" "$msg.tampered"
  check "$key/$scheme: a tampered message does NOT verify" \
    does_not_verify "$scheme" "$W/$key.cert.pub.pem" "$msg.tampered" "$sig"
  # ... nor against another key of the lab.
  other=lab-ec384
  [[ "$key" != lab-ec384 ]] || other=lab-ec256
  if [[ "$kind" == ecdsa ]]; then
    check "$key/$scheme: the signature does NOT verify with $other's key" \
      does_not_verify "$scheme" "$W/$other.cert.pub.pem" "$msg" "$sig"
  fi
done
((${#TAMPER_DONE[@]} == 4)) || fail "tamper checks ran for ${#TAMPER_DONE[@]} kinds, want 4"

# An explicit --version 1 is the active version.
random_file "$W/msg.v1" 100
expect_rc 0 "$CTL" --identity proxy -o json sign --key lab-ec256 --scheme ecdsa_secp256r1_sha256 \
  --version 1 --in "$W/msg.v1" --out "$W/sig.v1"
rid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["request_id"])' "$E2E_OUT")
check "lab-ec256 --version 1: OpenSSL verifies" \
  verifies ecdsa_secp256r1_sha256 "$W/lab-ec256.cert.pub.pem" "$W/msg.v1" "$W/sig.v1"
SIGNED+=("$rid lab-ec256 ecdsa_secp256r1_sha256 1 $W/msg.v1 $W/sig.v1")

# --digest: a precomputed SHA-256 digest signs the same as the message.
openssl dgst -sha256 -binary -out "$W/msg.v1.sha256" "$W/msg.v1"
expect_rc 0 "$CTL" --identity proxy -o json sign --key lab-rsa2048 --scheme rsa_pkcs1_sha256 \
  --digest --in "$W/msg.v1.sha256" --out "$W/sig.dg"
rid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["request_id"])' "$E2E_OUT")
check "lab-rsa2048 --digest: OpenSSL verifies the signature over the message" \
  verifies rsa_pkcs1_sha256 "$W/lab-rsa2048.cert.pub.pem" "$W/msg.v1" "$W/sig.dg"
SIGNED+=("$rid lab-rsa2048 rsa_pkcs1_sha256 1 $W/msg.v1 $W/sig.dg")

# Empty input is refused: custodyctl refuses an empty file itself (exit 2, nothing sent), for
# every scheme, and leaves no signature file behind.
: >"$W/empty"
for spec in "lab-ed25519 ed25519" "lab-ec256 ecdsa_secp256r1_sha256"; do
  set -- $spec
  expect_rc 2 "$CTL" --identity proxy sign --key "$1" --scheme "$2" --in "$W/empty" \
    --out "$W/sig.empty"
  check "$1: empty input refused by custodyctl" file_contains "$E2E_ERR" "is empty"
  check "$1: no signature file for empty input" test ! -e "$W/sig.empty"
done

# Signatures in parallel (more than the 8 HSM sessions): all succeed and verify.
pids=()
for i in $(seq 1 16); do
  random_file "$W/par.$i" 200
  "$CTL" --identity proxy -o json sign --key lab-ec256 --scheme ecdsa_secp256r1_sha256 \
    --in "$W/par.$i" --out "$W/par.$i.sig" >"$W/par.$i.json" 2>"$W/par.$i.err" &
  pids+=($!)
done
bad=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { bad=$((bad + 1)); cat -- "$W/par.$((i + 1)).err"; }
done
((bad == 0)) || fail "$bad of 16 parallel signatures failed"
for i in $(seq 1 16); do
  verifies ecdsa_secp256r1_sha256 "$W/lab-ec256.cert.pub.pem" "$W/par.$i" "$W/par.$i.sig" ||
    fail "parallel signature $i does not verify"
  rid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["request_id"])' "$W/par.$i.json")
  SIGNED+=("$rid lab-ec256 ecdsa_secp256r1_sha256 1 $W/par.$i $W/par.$i.sig")
done
pass "16 parallel signatures succeed and verify"

# ------------------------------------------------------------ audit log
LOG=$CUSTODY_AUDIT_LOG
[[ -s "$LOG" ]] || fail "audit log $LOG is empty"

# One record per successful signature: its request id, outcome OK, caller proxy, right
# key/scheme/version, action sign.
printf '%s\n' "${SIGNED[@]}" >"$W/signed.txt"
python3 - "$LOG" "$W/signed.txt" >"$W/audit-check.txt" <<'PY' || true
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for line in open(sys.argv[2]):
    rid, key, scheme, ver = line.split()[:4]
    got = [r for r in records if r.get("id") == rid]
    if len(got) != 1:
        print(f"BAD {rid}: {len(got)} audit records, want 1")
        continue
    r = got[0]
    want = {"action": "sign", "caller": "proxy", "key": key, "scheme": scheme,
            "version": int(ver), "outcome": "OK"}
    diff = {k: r.get(k) for k, v in want.items() if r.get(k) != v}
    print(f"BAD {rid}: {diff} (record {r})" if diff else f"OK {rid} {key} {scheme}")
PY
nrec=0
while read -r verdict rest; do
  [[ "$verdict" == OK ]] || fail "audit record: $rest"
  nrec=$((nrec + 1))
done <"$W/audit-check.txt"
((nrec == ${#SIGNED[@]})) || fail "audit checks: $nrec of ${#SIGNED[@]}"
pass "each of the $nrec signatures has exactly one audit record (OK, proxy, key/scheme/version)"

# No digest, signature or PIN in the audit log (nor in keyd's own log).
leaks=0
for rec in "${SIGNED[@]}"; do
  read -r rid key scheme ver msg sig <<<"$rec"
  h=$(hash_of "$scheme")
  if [[ "$h" != none ]]; then
    d=$(openssl dgst "-$h" -r "$msg" | cut -d' ' -f1)
  else
    d=$(hexof "$msg" | cut -c1-64) # Ed25519 signs the message itself: look for it
  fi
  s=$(hexof "$sig")
  sb64=$(base64 -w0 <"$sig")
  for secret in "$d" "${s:0:64}" "${sb64:0:40}"; do
    if grep -qiF -- "$secret" "$LOG" || grep -qiF -- "$secret" "$T/keyd.log"; then
      echo "leak of $rid ($key/$scheme): '$secret' appears in a log"
      leaks=$((leaks + 1))
    fi
  done
done
((leaks == 0)) || fail "$leaks digests/signatures found in the logs"
pass "no message digest or signature (hex or base64) of ${#SIGNED[@]} signatures in the audit or keyd log"
pin=$(tr -d '\n' <"$CUSTODY_PIN_FILE")
[[ -n "$pin" ]] || fail "empty PIN file"
check "the token PIN is not in the audit log" file_lacks "$LOG" "$pin"
check "the token PIN is not in the keyd log" file_lacks "$T/keyd.log" "$pin"

# Hash chain.
expect_rc 0 "$CTL" audit verify
check "audit verify reports an intact chain" file_contains "$E2E_OUT" "hash chain intact"
expect_rc 0 "$CTL" audit verify "$LOG"

# Change one character in a middle line (kept valid JSON: a digit of latency_us).
python3 - "$LOG" "$W/audit.tampered" <<'PY'
import sys
lines = open(sys.argv[1]).read().splitlines(True)
i = len(lines) // 2
l = lines[i]
k = l.index('"latency_us":') + len('"latency_us":')
lines[i] = l[:k] + ("1" if l[k] != "1" else "2") + l[k + 1:]
open(sys.argv[2], "w").write("".join(lines))
PY
changed=$(diff -- "$LOG" "$W/audit.tampered" | grep -c '^[<>]' || true)
check "the tampered copy differs from the log in exactly one line" test "$changed" = 2
expect_rc 1 "$CTL" audit verify "$W/audit.tampered"
check "audit verify names the broken chain" file_contains "$E2E_ERR" "hash chain broken"

# Remove a middle record.
lines=$(wc -l <"$LOG")
sed "$((lines / 2))d" -- "$LOG" >"$W/audit.cut"
expect_rc 1 "$CTL" audit verify "$W/audit.cut"

# The live log is still intact after all this.
expect_rc 0 "$CTL" audit verify "$LOG"

e2e_finish
