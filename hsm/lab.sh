#!/usr/bin/env bash
# hsm/lab.sh - build the SoftHSM2 test lab for custody.
#
#   hsm/lab.sh init DIR [--force]   build a complete lab in DIR (see `help`)
#   hsm/lab.sh help
#
# Everything lives in DIR; nothing outside it is modified. PINs never appear on
# a command line: tools get them through the environment (pkcs11-tool
# `--pin env:VAR`) or a 0600 file in DIR (the OpenSSL engine config).
#
# Tool quirks this script works around (SoftHSM 2.6, OpenSC 0.23, libp11 0.4.12,
# OpenSSL 3.0):
#  - softhsm2-util takes PINs on argv only: the token is initialised with
#    pkcs11-tool instead.
#  - pkcs11-tool --read-object writes an Ed25519 public key as PEM (DER for the
#    others) and cannot export a P-384 key at all; EC public keys then fall back
#    to an SPKI built from CKA_EC_PARAMS + CKA_EC_POINT (and every exported EC
#    key is cross-checked against CKA_EC_POINT).
#  - libp11 0.4.12 (the pkcs11 engine) cannot enumerate private keys at all once
#    the token holds an Ed25519 (CKK_EC_EDWARDS) private key: every key lookup
#    then fails ("Unable to enumerate private keys") and openssl segfaults. So
#    every engine signature happens BEFORE lab-ed25519 is generated, and the
#    lab-ed25519 certificate is signed by the CA key with pkcs11-tool (C_Sign,
#    CKM_ECDSA over a SHA-256 of the TBSCertificate) and assembled here.
set -euo pipefail
umask 077

PROG=${0##*/}
TOKEN_LABEL=custody-lab
CA_KEY=lab-ca
SERVED_KEYS=(lab-ec256 lab-ec384 lab-rsa2048 lab-ed25519)
CLIENT_IDS=(proxy admin intruder)
MARKER=.custody-lab # written first while building; lets --force clean up a crashed build

usage() {
  cat <<EOF
usage: $PROG init DIR [--force] [--no-ed25519]
       $PROG help

init DIR   Build a SoftHSM2 lab in DIR (created if absent; must be empty):
           token '$TOKEN_LABEL' with key pairs generated inside it
           (${SERVED_KEYS[*]} $CA_KEY), a lab CA whose key stays in the
           token, server certificates for the served keys, the key service's
           TLS identity, client identities (${CLIENT_IDS[*]}), keyd.yaml and
           lab.env. lab.env is written last: its presence means the lab is complete.
--force    If DIR already holds a lab (or the remains of a failed build),
           wipe it and build a new one. Never wipes a directory that is not a lab.
--no-ed25519
           Leave lab-ed25519 out. libp11's OpenSSL engine (0.4.12) cannot list the
           token's keys once an Ed25519 key is in it, so a peer that reads keys
           through the engine (nginx in bench/proxy.sh) needs such a token.

Environment:
  CUSTODY_PKCS11_MODULE   PKCS#11 module (default: SoftHSM2's libsofthsm2.so)
  CUSTODY_PKCS11_ENGINE   libp11 OpenSSL engine (default: ENGINESDIR/pkcs11.so)

Then: source DIR/lab.env
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { say "error: $*"; exit 1; }
refuse() { say "$*"; exit 2; }

# ---------------------------------------------------------------- arguments
cmd=${1:-}
case "$cmd" in
  help | -h | --help) usage; exit 0 ;;
  init) shift ;;
  "") usage >&2; exit 2 ;;
  *) say "unknown command: $cmd"; usage >&2; exit 2 ;;
esac

force=0
no_ed25519=0
dir_arg=
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    --no-ed25519) no_ed25519=1 ;;
    -*) refuse "unknown option: $a" ;;
    *)
      [[ -z "$dir_arg" ]] || refuse "only one DIR may be given"
      dir_arg=$a
      ;;
  esac
done
[[ -n "$dir_arg" ]] || { usage >&2; exit 2; }

# Paths end up in YAML, OpenSSL config files and pkcs11 URIs: keep them plain.
safe_path_re='^/[A-Za-z0-9._/@+,=-]*$'

DIR=$(realpath -m -- "$dir_arg")
[[ "$DIR" =~ $safe_path_re ]] ||
  refuse "DIR must be made of [A-Za-z0-9._/@+,=-] only (got: $DIR)"
case "$DIR" in
  / | /bin | /boot | /dev | /etc | /home | /lib | /lib64 | /opt | /proc | /root | /run | /sbin | /srv | /sys | /tmp | /usr | /var)
    refuse "refusing to use $DIR as a lab directory" ;;
esac
[[ "$DIR" != "$(realpath -m -- "${HOME:-/}")" ]] || refuse "refusing to use \$HOME as a lab directory"

# ---------------------------------------------------------------- DIR state
created_dir=0
if [[ -e "$DIR" || -L "$DIR" ]]; then
  [[ -d "$DIR" && ! -L "$DIR" ]] || refuse "$DIR exists and is not a directory"
  if [[ -n "$(ls -A -- "$DIR")" ]]; then
    if [[ -e "$DIR/lab.env" || -e "$DIR/$MARKER" ]]; then
      if ((force == 0)); then
        if [[ -e "$DIR/lab.env" ]]; then
          refuse "$DIR already holds a lab; use '$PROG init $DIR --force' to wipe and rebuild it"
        fi
        refuse "$DIR holds an incomplete lab (a build failed or was killed); use --force to wipe and rebuild it"
      fi
      say "--force: wiping the lab in $DIR"
      find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
    else
      refuse "$DIR is not empty and does not look like a lab (no lab.env); refusing to touch it"
    fi
  fi
else
  [[ -d "$(dirname -- "$DIR")" ]] || refuse "parent directory of $DIR does not exist"
  mkdir -- "$DIR"
  created_dir=1
fi

# ---------------------------------------------------------------- failure handling
STEP="start"
LOG="$DIR/.build/log"
finished=0

on_exit() {
  local rc=$?
  set +e                      # clean up no matter what:
  trap '' INT TERM HUP PIPE   # not interruptible, and stderr may be a closed pipe
  ((finished)) && return 0
  ((rc != 0)) || rc=1
  say "FAILED during step: $STEP (exit $rc)"
  if [[ -s "$LOG" ]]; then
    say "last tool output:"
    tail -n 15 -- "$LOG" | sed 's/^/    /' >&2
  fi
  if ((created_dir)); then
    rm -rf -- "$DIR"
  else
    find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} + 2>/dev/null || true
  fi
  say "removed the partial lab in $DIR"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
trap 'exit 141' PIPE

step() { # a step worth a progress line
  STEP=$*
  say "$*"
}
substep() { STEP=$*; } # named in the failure message only

: >"$DIR/$MARKER"
mkdir -p "$DIR/.build" "$DIR/tokens" "$DIR/keys" "$DIR/certs" "$DIR/identities"
: >"$LOG"
T="$DIR/.build" # scratch, removed at the end

# Run a tool with its chatter going to the build log (shown on failure).
quiet() { "$@" >>"$LOG" 2>&1; }

# ---------------------------------------------------------------- tools
step "locating the PKCS#11 module and the OpenSSL engine"
MODULE=${CUSTODY_PKCS11_MODULE:-}
if [[ -z "$MODULE" ]]; then
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [[ -f "$m" ]]; then MODULE=$m; break; fi
  done
fi
if [[ -z "$MODULE" ]]; then
  MODULE=$(find /usr/lib /usr/local/lib -name libsofthsm2.so -print -quit 2>/dev/null || true)
fi
[[ -n "$MODULE" ]] || die "SoftHSM2 module libsofthsm2.so not found; set CUSTODY_PKCS11_MODULE"
[[ -f "$MODULE" ]] || die "PKCS#11 module not found: $MODULE"
MODULE=$(realpath -s -- "$MODULE") # absolute, symlinks kept
[[ "$MODULE" =~ $safe_path_re ]] || die "module path has unusual characters: $MODULE"

ENGINE=${CUSTODY_PKCS11_ENGINE:-}
if [[ -z "$ENGINE" ]]; then
  enginesdir=$(openssl version -e | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
  for e in "$enginesdir/pkcs11.so" "$enginesdir/libpkcs11.so"; do
    if [[ -f "$e" ]]; then ENGINE=$e; break; fi
  done
fi
if [[ -z "$ENGINE" ]]; then
  ENGINE=$(find /usr/lib /usr/local/lib -path '*engines*' -name pkcs11.so -print -quit 2>/dev/null || true)
fi
[[ -n "$ENGINE" && -f "$ENGINE" ]] || die "libp11 OpenSSL engine (pkcs11.so) not found; set CUSTODY_PKCS11_ENGINE"
[[ "$ENGINE" =~ $safe_path_re ]] || die "engine path has unusual characters: $ENGINE"
for tool in pkcs11-tool openssl python3 od; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

# ---------------------------------------------------------------- helpers
# CKA_ID of version 1 of a key NAME: the ASCII bytes of "NAME/v1", in hex.
key_id() { printf '%s/v1' "$1" | od -An -tx1 | tr -d ' \n'; }

USER_PIN=
SO_PIN=
# pkcs11-tool against the lab token; the PIN travels in the environment only.
p11() {
  CUSTODY_LAB_USER_PIN=$USER_PIN pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "$@"
}
p11_login() { p11 --login --pin env:CUSTODY_LAB_USER_PIN "$@"; }

# Small helpers bash is bad at (parsing pkcs11-tool listings, DER); python3 stdlib only.
cat >"$T/labtool.py" <<'PY'
import hashlib, socket, sys

CLASSES = {"Private Key Object": "priv", "Public Key Object": "pub", "Certificate Object": "cert"}


def objects(path):
    """Parse `pkcs11-tool -O` output into dicts (pkcs11-tool -O ignores --id/--label)."""
    objs, cur = [], None
    for line in open(path).read().splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            head = line.split(";")[0].strip()
            cur = {"class": CLASSES.get(head, head)}
            objs.append(cur)
        elif cur is not None and ":" in line:
            k, v = line.strip().split(":", 1)
            cur[k.strip()] = v.strip()
    return objs


def with_id(path, oid, cls=None):
    return [o for o in objects(path)
            if o.get("ID", "").lower() == oid.lower() and (cls is None or o["class"] == cls)]


def one(objs, what):
    if len(objs) != 1:
        sys.exit(f"expected exactly one {what}, found {len(objs)}")
    return objs[0]


def octet_string_content(hexstr):
    b = bytes.fromhex(hexstr)
    if b[:1] != b"\x04" or len(b) < 2:
        sys.exit("CKA_EC_POINT is not a DER OCTET STRING")
    n = b[1]
    return b[2:2 + n] if n < 0x80 else b[2 + (n & 0x7F):]


def tlv(buf, off):
    """(header length, total length) of the DER TLV at off."""
    n = buf[off + 1]
    if n < 0x80:
        return 2, 2 + n
    k = n & 0x7F
    return 2 + k, 2 + k + int.from_bytes(buf[off + 2:off + 2 + k], "big")


def der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def main(cmd, *a):
    if cmd == "privcheck":  # LIST NAME ID: private key sensitive, never extractable, generated in the token
        path, name, oid = a
        o = one(with_id(path, oid, "priv"), f"private key with id {oid}")
        access = [x.strip() for x in o.get("Access", "").split(",")]
        bad = [f"label is {o.get('label')!r}"] if o.get("label") != name else []
        bad += [f"not '{n}'" for n in ("sensitive", "always sensitive", "never extractable", "local")
                if n not in access]
        bad += ["extractable"] if "extractable" in access else []
        if bad:
            sys.exit(f"{name}: private key check failed: {', '.join(bad)} (Access: {o.get('Access')})")
    elif cmd == "ec-spki":  # LIST ID OUT: SubjectPublicKeyInfo DER built from CKA_EC_PARAMS + CKA_EC_POINT
        path, oid, out = a
        o = one(with_id(path, oid, "pub"), "public key")
        point = octet_string_content(o.get("EC_POINT", ""))
        params = bytes.fromhex(o.get("EC_PARAMS", "").split()[0])
        if params == b"\x13\x0cedwards25519" or params == bytes.fromhex("06032b6570"):
            if len(point) != 32:
                sys.exit("Ed25519 point is not 32 bytes")
            spki = bytes.fromhex("302a300506032b6570032100") + point
        elif params[:1] == b"\x06":  # named curve OID
            alg = bytes.fromhex("06072a8648ce3d0201") + params  # id-ecPublicKey, curve
            alg = b"\x30" + der_len(len(alg)) + alg
            bits = b"\x00" + point
            body = alg + b"\x03" + der_len(len(bits)) + bits
            spki = b"\x30" + der_len(len(body)) + body
        else:
            sys.exit(f"unsupported CKA_EC_PARAMS {params.hex()}")
        open(out, "wb").write(spki)
    elif cmd == "pointcheck":  # LIST ID SPKI_DER: the exported key is the token's key
        path, oid, spki = a
        point = octet_string_content(one(with_id(path, oid, "pub"), "public key").get("EC_POINT", ""))
        if len(point) < 32 or not open(spki, "rb").read().endswith(point):
            sys.exit("exported public key does not match the token's CKA_EC_POINT")
    elif cmd == "objcheck":  # LIST NAME ID: one private key, public key, certificate with ID; all labelled NAME
        path, name, oid = a
        objs = with_id(path, oid)
        got = sorted(o["class"] for o in objs)
        labels = sorted({str(o.get("label")) for o in objs})
        stray = [o for o in objects(path) if o.get("label") == name and o.get("ID", "").lower() != oid.lower()]
        if got != ["cert", "priv", "pub"] or labels != [name] or stray:
            sys.exit(f"{name}: unexpected token objects: {got}, labels {labels}, {len(stray)} stray")
    elif cmd == "tbs":  # CERT_DER TBS_OUT SHA256_OUT
        der = open(a[0], "rb").read()
        h, _ = tlv(der, 0)
        _, tl = tlv(der, h)
        tbs = der[h:h + tl]
        if der[0] != 0x30 or tbs[0] != 0x30:
            sys.exit("not a certificate")
        open(a[1], "wb").write(tbs)
        open(a[2], "wb").write(hashlib.sha256(tbs).digest())
    elif cmd == "assemble":  # TBS SIG_DER OUT: Certificate signed ecdsa-with-SHA256
        tbs, sig = open(a[0], "rb").read(), open(a[1], "rb").read()
        if sig[:1] != b"\x30":
            sys.exit("ECDSA signature is not DER")
        bits = b"\x00" + sig
        body = tbs + bytes.fromhex("300a06082a8648ce3d040302") + b"\x03" + der_len(len(bits)) + bits
        open(a[2], "wb").write(b"\x30" + der_len(len(body)) + body)
    elif cmd == "ports":  # N: N distinct free loopback TCP ports (all bound at once)
        socks = []
        for _ in range(int(a[0])):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
        for s in socks:
            s.close()
    else:
        sys.exit(f"labtool: unknown command {cmd}")


main(*sys.argv[1:])
PY
labtool() { python3 "$T/labtool.py" "$@" 2>>"$LOG"; }

# ---------------------------------------------------------------- token
step "creating softhsm2.conf and PINs"
cat >"$DIR/softhsm2.conf" <<EOF
# SoftHSM2 configuration of the custody lab (written by hsm/lab.sh)
directories.tokendir = $DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
export SOFTHSM2_CONF="$DIR/softhsm2.conf"

USER_PIN=$(openssl rand -hex 8)
SO_PIN=$(openssl rand -hex 8)
[[ "$USER_PIN" =~ ^[0-9a-f]{16}$ && "$SO_PIN" =~ ^[0-9a-f]{16}$ ]] || die "could not generate PINs"
printf '%s' "$USER_PIN" >"$DIR/pin"
chmod 600 "$DIR/pin"

step "initialising token '$TOKEN_LABEL'"
CUSTODY_LAB_SO_PIN=$SO_PIN quiet pkcs11-tool --module "$MODULE" --slot-index 0 \
  --init-token --label "$TOKEN_LABEL" --so-pin env:CUSTODY_LAB_SO_PIN
CUSTODY_LAB_SO_PIN=$SO_PIN CUSTODY_LAB_USER_PIN=$USER_PIN quiet pkcs11-tool --module "$MODULE" \
  --token-label "$TOKEN_LABEL" --init-pin --login --login-type so \
  --so-pin env:CUSTODY_LAB_SO_PIN --new-pin env:CUSTODY_LAB_USER_PIN
SO_PIN= # not kept: the lab never needs the SO again
quiet p11_login --test

# Generate a key pair inside the token, check its private half, export its public half.
gen_key() {
  local name=$1 type=$2 id
  id=$(key_id "$name")
  step "generating $name ($type) inside the token"
  quiet p11_login --keypairgen --key-type "$type" --sensitive --usage-sign \
    --label "$name" --id "$id"

  substep "checking that $name's private key is sensitive and never extractable"
  p11_login -O >"$T/objects.txt" 2>>"$LOG"
  labtool privcheck "$T/objects.txt" "$name" "$id"

  substep "exporting $name's public key"
  local raw="$T/$name.pub.raw" pem="$DIR/keys/$name.pub.pem"
  # pkcs11-tool 0.23 writes DER for RSA and P-256, PEM for Ed25519, and fails
  # ("cannot create EVP_PKEY") for P-384: EC keys fall back to an SPKI built
  # from the token's CKA_EC_PARAMS and CKA_EC_POINT.
  if quiet p11 --read-object --type pubkey --id "$id" -o "$raw" &&
    { openssl pkey -pubin -inform DER -in "$raw" -out "$pem" 2>>"$LOG" ||
      openssl pkey -pubin -inform PEM -in "$raw" -out "$pem" 2>>"$LOG"; }; then
    :
  else
    [[ "$type" == EC:* ]] || die "cannot export the public key of $name"
    echo "(building the SPKI of $name from CKA_EC_PARAMS/CKA_EC_POINT)" >>"$LOG"
    labtool ec-spki "$T/objects.txt" "$id" "$T/$name.spki.der"
    openssl pkey -pubin -inform DER -in "$T/$name.spki.der" -out "$pem" 2>>"$LOG"
  fi
  if [[ "$type" == EC:* ]]; then
    # The exported key must be the one the token holds.
    openssl pkey -pubin -in "$pem" -outform DER -out "$T/$name.check.der" 2>>"$LOG"
    labtool pointcheck "$T/objects.txt" "$id" "$T/$name.check.der"
  fi
}

# Import a certificate into the token under the naming convention.
import_cert() {
  local name=$1 pem=$2
  substep "importing $name's certificate into the token"
  openssl x509 -in "$pem" -outform DER -out "$T/$name.crt.der"
  quiet p11_login --write-object "$T/$name.crt.der" --type cert --label "$name" --id "$(key_id "$name")"
}

serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# ---------------------------------------------------------------- keys (all but Ed25519: see top)
gen_key "$CA_KEY" EC:prime256v1
gen_key lab-ec256 EC:prime256v1
gen_key lab-ec384 EC:secp384r1
gen_key lab-rsa2048 rsa:2048

# ---------------------------------------------------------------- engine
step "writing the OpenSSL engine configuration"
cat >"$DIR/openssl-engine.cnf" <<EOF
# OpenSSL config loading the libp11 pkcs11 engine for the custody lab token.
# Use: OPENSSL_CONF=$DIR/openssl-engine.cnf openssl ... -engine pkcs11 -keyform engine \\
#        -key 'pkcs11:token=$TOKEN_LABEL;object=NAME;type=private'
# NOTE: libp11 0.4.12 fails to find ANY key in a token holding an Ed25519 private
# key, so this no longer works once lab-ed25519 exists (lab.sh signs before that).
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $ENGINE
MODULE_PATH = $MODULE
PIN = $USER_PIN

[req]
distinguished_name = req_dn
prompt = no

[req_dn]
EOF
chmod 600 "$DIR/openssl-engine.cnf"
CA_URI="pkcs11:token=$TOKEN_LABEL;object=$CA_KEY;type=private"

# openssl with the engine config; stdin closed so nothing can prompt for a PIN.
eng_openssl() { OPENSSL_CONF="$DIR/openssl-engine.cnf" openssl "$@" </dev/null; }

# ---------------------------------------------------------------- CA
step "creating the lab CA certificate (signed inside the token)"
quiet eng_openssl req -x509 -new -engine pkcs11 -keyform engine -key "$CA_URI" \
  -subj "/O=custody lab/CN=custody lab CA" -days 3650 -sha256 -set_serial "$(serial)" \
  -addext "basicConstraints = critical,CA:TRUE" \
  -addext "keyUsage = critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier = hash" \
  -out "$DIR/ca.crt"
quiet openssl verify -CAfile "$DIR/ca.crt" "$DIR/ca.crt"
import_cert "$CA_KEY" "$DIR/ca.crt"

# Write an extension file for a leaf certificate: ext_file FILE EKU [SAN]
ext_file() {
  {
    echo "basicConstraints = critical,CA:FALSE"
    echo "keyUsage = critical,digitalSignature"
    echo "extendedKeyUsage = $2"
    [[ -z "${3:-}" ]] || echo "subjectAltName = $3"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
  } >"$1"
}

# Issue a leaf certificate for a public key, signed by the CA key in the token.
# issue PUBKEY_PEM SUBJECT DAYS EXTFILE OUT_PEM
issue() {
  quiet eng_openssl x509 -new -subj "$2" -force_pubkey "$1" -days "$3" -sha256 \
    -set_serial "$(serial)" -extfile "$4" \
    -CA "$DIR/ca.crt" -engine pkcs11 -CAkeyform engine -CAkey "$CA_URI" -out "$5"
}

server_san() { printf 'DNS:localhost, IP:127.0.0.1, DNS:*.lab.test, DNS:%s.lab.test' "$1"; }

for name in lab-ec256 lab-ec384 lab-rsa2048; do
  short=${name#lab-}
  step "issuing the server certificate of $name"
  ext_file "$T/$name.ext" serverAuth "$(server_san "$short")"
  issue "$DIR/keys/$name.pub.pem" "/O=custody lab/CN=$short.lab.test" 825 "$T/$name.ext" "$DIR/certs/$name.crt"
  import_cert "$name" "$DIR/certs/$name.crt"
done

# ---------------------------------------------------------------- file identities
step "creating the key service TLS identity (keyd.key, keyd.crt)"
quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/keyd.key"
openssl pkey -in "$DIR/keyd.key" -pubout -out "$T/keyd.pub.pem" 2>>"$LOG"
ext_file "$T/keyd.ext" serverAuth "DNS:localhost, IP:127.0.0.1"
issue "$T/keyd.pub.pem" "/O=custody lab/CN=custody-keyd" 825 "$T/keyd.ext" "$DIR/keyd.crt"

for who in "${CLIENT_IDS[@]}"; do
  step "creating client identity '$who'"
  quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/identities/$who.key"
  openssl pkey -in "$DIR/identities/$who.key" -pubout -out "$T/$who.pub.pem" 2>>"$LOG"
  ext_file "$T/$who.ext" clientAuth
  issue "$T/$who.pub.pem" "/O=custody lab/CN=$who" 825 "$T/$who.ext" "$DIR/identities/$who.crt"
done

# ---------------------------------------------------------------- Ed25519 (engine unusable from here on)
if ((no_ed25519)); then
  SERVED_KEYS=(lab-ec256 lab-ec384 lab-rsa2048)
else
  gen_key lab-ed25519 EC:edwards25519

  step "issuing the server certificate of lab-ed25519 (CA signs with C_Sign via pkcs11-tool)"
  # 1. A throw-away software key and a stand-in CA certificate with the lab CA's
  #    exact subject and subject key identifier let openssl lay out the
  #    TBSCertificate (issuer, AKID, extensions) for us.
  # 2. The CA key in the token signs SHA-256(TBSCertificate) with CKM_ECDSA.
  # 3. The certificate is reassembled with that signature; openssl verify checks it below.
  ca_ski=$(openssl x509 -in "$DIR/ca.crt" -noout -ext subjectKeyIdentifier | tail -n 1 | tr -d ' ')
  [[ "$ca_ski" =~ ^[0-9A-F:]+$ ]] || die "cannot read the CA subject key identifier"
  quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$T/standin.key"
  printf '[req]\ndistinguished_name = req_dn\nprompt = no\n[req_dn]\n' >"$T/plain.cnf"
  quiet openssl req -x509 -new -key "$T/standin.key" -subj "/O=custody lab/CN=custody lab CA" -days 1 \
    -config "$T/plain.cnf" \
    -addext "basicConstraints = critical,CA:TRUE" \
    -addext "keyUsage = critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier = $ca_ski" \
    -out "$T/standin-ca.crt"
  ext_file "$T/lab-ed25519.ext" serverAuth "$(server_san ed25519)"
  quiet openssl x509 -new -subj "/O=custody lab/CN=ed25519.lab.test" -force_pubkey "$DIR/keys/lab-ed25519.pub.pem" \
    -days 825 -sha256 -set_serial "$(serial)" -extfile "$T/lab-ed25519.ext" \
    -CA "$T/standin-ca.crt" -CAkey "$T/standin.key" -outform DER -out "$T/ed25519.standin.der"
  labtool tbs "$T/ed25519.standin.der" "$T/ed25519.tbs.der" "$T/ed25519.tbs.sha256"
  quiet p11_login --sign --mechanism ECDSA --signature-format openssl --id "$(key_id "$CA_KEY")" \
    --input-file "$T/ed25519.tbs.sha256" --output-file "$T/ed25519.sig.der"
  labtool assemble "$T/ed25519.tbs.der" "$T/ed25519.sig.der" "$T/ed25519.crt.der"
  openssl x509 -inform DER -in "$T/ed25519.crt.der" -out "$DIR/certs/lab-ed25519.crt" 2>>"$LOG"
  import_cert lab-ed25519 "$DIR/certs/lab-ed25519.crt"
fi

# ---------------------------------------------------------------- checks
step "verifying every certificate against the lab CA"
quiet openssl verify -CAfile "$DIR/ca.crt" -purpose sslserver \
  "$DIR"/certs/*.crt "$DIR/keyd.crt"
quiet openssl verify -CAfile "$DIR/ca.crt" -purpose sslclient "$DIR"/identities/*.crt
for name in "${SERVED_KEYS[@]}"; do
  # The certificate must carry the token key's public key.
  a=$(openssl x509 -in "$DIR/certs/$name.crt" -noout -pubkey | openssl pkey -pubin -outform DER | od -An -tx1 | tr -d ' \n')
  b=$(openssl pkey -pubin -in "$DIR/keys/$name.pub.pem" -outform DER | od -An -tx1 | tr -d ' \n')
  [[ -n "$a" && "$a" == "$b" ]] || die "certificate of $name does not carry the token's public key"
done

step "checking the token objects (label/id convention)"
p11_login -O >"$T/objects.txt" 2>>"$LOG"
for name in "$CA_KEY" "${SERVED_KEYS[@]}"; do
  labtool objcheck "$T/objects.txt" "$name" "$(key_id "$name")"
done

# ---------------------------------------------------------------- ports
step "choosing free loopback ports"
read -r KEYD_PORT METRICS_PORT PROXY_PORT BACKEND_PORT PROXY_METRICS_PORT < <(labtool ports 5)
for p in "$KEYD_PORT" "$METRICS_PORT" "$PROXY_PORT" "$BACKEND_PORT" "$PROXY_METRICS_PORT"; do
  [[ "$p" =~ ^[0-9]+$ ]] || die "could not choose ports"
done

# ---------------------------------------------------------------- keyd.yaml
step "writing keyd.yaml"
# The same-host way in (gRPC over a Unix socket, callers known by uid): for a proxy next to keyd.
# Left out when the lab folder is too deep for a socket path (107 bytes at most).
# Its signing socket carries handshake signatures only, without gRPC (less CPU per handshake).
KEYD_SOCKET=
KEYD_SIGNING_SOCKET=
UNIX_SOCKET_YAML=
if [ ${#DIR} -lt 90 ]; then
  KEYD_SOCKET="$DIR/keyd.sock"
  KEYD_SIGNING_SOCKET="$DIR/keyd-sign.sock"
  UNIX_SOCKET_YAML="unix_socket:
  path: \"$KEYD_SOCKET\"
  signing_path: \"$KEYD_SIGNING_SOCKET\"
  identity: \"proxy\""
fi
cat >"$DIR/keyd.yaml" <<EOF
# custody-keyd configuration written by hsm/lab.sh
listen: "127.0.0.1:$KEYD_PORT"
tls:
  cert_file: "$DIR/keyd.crt"
  key_file: "$DIR/keyd.key"
  client_ca_file: "$DIR/ca.crt"
hsm:
  module: "$MODULE"
  token_label: "$TOKEN_LABEL"
  pin_file: "$DIR/pin"
  sessions: 8
audit:
  path: "$DIR/audit.log"
metrics:
  listen: "127.0.0.1:$METRICS_PORT"
limits:
  sign_timeout_ms: 2000
  max_message_bytes: 65536
$UNIX_SOCKET_YAML
policy:
  # The proxy signs handshakes with the served keys only: never with the CA key (lab-ca).
  - identity: "proxy"
    sign: [$(printf '"%s", ' "${SERVED_KEYS[@]}" | sed 's/, $//')]
  - identity: "admin"
    read: ["*"]
    admin: true
  - identity: "intruder"
EOF

# ---------------------------------------------------------------- proxy.yaml
# proxy_yaml KEY_SERVICE: a proxy configuration serving every lab key, reaching the key service
# as KEY_SERVICE (the lines of its key_service section) says.
proxy_yaml() {
  cat <<EOF
# custody-proxy configuration written by hsm/lab.sh. No private key of a served identity is
# named here: each certificate names its key in the key service, which signs in the token.
key_service:
$1
  sign_timeout_ms: 2000
listeners:
  - name: "lab"
    listen: "127.0.0.1:$PROXY_PORT"
    certificates:
      - key: "lab-ec256"
        server_names: ["ec256.lab.test"]
        default: true
      - key: "lab-ec384"
        server_names: ["ec384.lab.test"]
      - key: "lab-rsa2048"
        server_names: ["rsa2048.lab.test"]
$( ((no_ed25519)) || printf '      - key: "lab-ed25519"\n        server_names: ["ed25519.lab.test"]')
    tls:
      min_version: "1.2"
      alpn: ["http/1.1"]
    backend:
      address: "127.0.0.1:$BACKEND_PORT"
limits:
  handshake_timeout_ms: 10000
  idle_timeout_ms: 60000
  drain_timeout_ms: 10000
metrics:
  listen: "127.0.0.1:$PROXY_METRICS_PORT"
EOF
}
step "writing proxy.yaml"
proxy_yaml "  addresses: [\"127.0.0.1:$KEYD_PORT\"]
  ca_file: \"$DIR/ca.crt\"
  # The proxy's own identity towards the key service (CN=proxy), not a served key.
  cert_file: \"$DIR/identities/proxy.crt\"
  key_file: \"$DIR/identities/proxy.key\"" >"$DIR/proxy.yaml"
if [ -n "$KEYD_SOCKET" ]; then
  # The same proxy next to keyd, on its Unix sockets (known by uid): no TLS files at all;
  # handshake signatures on the signing socket, the rest (and fallback) gRPC on keyd.sock.
  proxy_yaml "  addresses: [\"unix:$KEYD_SOCKET\"]
  signing_socket: \"$KEYD_SIGNING_SOCKET\"" >"$DIR/proxy-unix.yaml"
fi

# ---------------------------------------------------------------- finish
substep "cleaning up scratch files"
USER_PIN=
rm -rf -- "$T"

step "writing lab.env"
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
env_line() { # env_line NAME VALUE COMMENT
  printf '# %s\nexport %s=%s\n' "$3" "$1" "$(sq "$2")"
}
{
  echo "# custody lab environment written by hsm/lab.sh; source it from bash."
  env_line CUSTODY_LAB_DIR "$DIR" "lab directory"
  env_line SOFTHSM2_CONF "$DIR/softhsm2.conf" "SoftHSM2 configuration (token store in the lab directory)"
  env_line CUSTODY_PKCS11_MODULE "$MODULE" "PKCS#11 module"
  env_line CUSTODY_TOKEN_LABEL "$TOKEN_LABEL" "label of the lab token"
  env_line CUSTODY_PIN_FILE "$DIR/pin" "file holding the token user PIN (mode 0600)"
  env_line CUSTODY_KEYD_CONFIG "$DIR/keyd.yaml" "custody-keyd configuration"
  env_line CUSTODY_KEYD_ADDR "127.0.0.1:$KEYD_PORT" "key service gRPC address"
  env_line CUSTODY_KEYD_METRICS_ADDR "127.0.0.1:$METRICS_PORT" "key service metrics address"
  if [ -n "$KEYD_SOCKET" ]; then
    env_line CUSTODY_KEYD_SOCKET "unix:$KEYD_SOCKET" "key service Unix socket (same-host callers, known by uid)"
    env_line CUSTODY_KEYD_SIGNING_SOCKET "$KEYD_SIGNING_SOCKET" "key service signing socket (handshake signatures without gRPC, same-host callers)"
    env_line CUSTODY_PROXY_UNIX_CONFIG "$DIR/proxy-unix.yaml" "custody-proxy configuration reaching keyd over its Unix sockets"
  fi
  env_line CUSTODY_PROXY_CONFIG "$DIR/proxy.yaml" "custody-proxy configuration"
  env_line CUSTODY_PROXY_ADDR "127.0.0.1:$PROXY_PORT" "custody-proxy TLS listener"
  env_line CUSTODY_PROXY_METRICS_ADDR "127.0.0.1:$PROXY_METRICS_PORT" "custody-proxy metrics address"
  env_line CUSTODY_BACKEND_ADDR "127.0.0.1:$BACKEND_PORT" "the lab backend (custody-lab-backend)"
  env_line CUSTODY_CA "$DIR/ca.crt" "lab CA certificate (its key is lab-ca in the token)"
  env_line CUSTODY_AUDIT_LOG "$DIR/audit.log" "key service audit log"
  env_line CUSTODY_KEYD_CERT "$DIR/keyd.crt" "key service TLS certificate"
  env_line CUSTODY_KEYD_KEY "$DIR/keyd.key" "key service TLS private key (file key)"
  for who in "${CLIENT_IDS[@]}"; do
    up=${who^^}
    env_line "CUSTODY_${up}_CERT" "$DIR/identities/$who.crt" "client certificate of identity '$who' (mTLS)"
    env_line "CUSTODY_${up}_KEY" "$DIR/identities/$who.key" "client private key of identity '$who'"
  done
} >"$DIR/lab.env.tmp"
mv -- "$DIR/lab.env.tmp" "$DIR/lab.env"
rm -f -- "$DIR/$MARKER"

finished=1
trap - EXIT INT TERM HUP PIPE
printf 'lab ready: %s\nsource %s/lab.env\n' "$DIR" "$DIR"
