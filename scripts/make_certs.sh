#!/usr/bin/env bash
# Make a private certificate authority (CA) and a TLS certificate for the Flower SuperLink, signed by that CA.
#
#   bash scripts/make_certs.sh OUT_DIR [NAME_OR_IP ...]
#
# The server certificate is valid for 127.0.0.1, ::1 and localhost plus every NAME_OR_IP given (the host names
# and addresses SuperNodes and the flwr CLI use to reach the SuperLink; an IP address is detected and becomes
# an IP SAN). Writes OUT_DIR/ca.crt (give it to every SuperNode and to the flwr CLI), OUT_DIR/ca.key (keep it
# offline; it signs certificates), OUT_DIR/server.crt and OUT_DIR/server.key (the SuperLink's). Existing files
# are not overwritten: remove them first to make new ones. Needs the `openssl` command (1.1.1 or 3.x).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [NAME_OR_IP ...]" >&2
    exit 2
fi
OUT=$1
shift
mkdir -p "$OUT"
for f in ca.crt ca.key server.crt server.key; do
    if [[ -e "$OUT/$f" ]]; then
        echo "$OUT/$f exists; remove the old certificates first" >&2
        exit 1
    fi
done

SAN="IP:127.0.0.1,IP:::1,DNS:localhost"
for name in "$@"; do
    if [[ $name =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $name == *:* ]]; then
        SAN="$SAN,IP:$name"
    else
        SAN="$SAN,DNS:$name"
    fi
done
CN=${1:-localhost}

umask 077
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/ca.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = fl-compams SuperLink CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF

cat > "$WORK/server.ext" <<CNF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $SAN
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
CNF

openssl genrsa -out "$OUT/ca.key" 3072 2>/dev/null
openssl req -x509 -new -key "$OUT/ca.key" -sha256 -days 3650 -config "$WORK/ca.cnf" -out "$OUT/ca.crt"
openssl genrsa -out "$OUT/server.key" 2048 2>/dev/null
openssl req -new -key "$OUT/server.key" -subj "/CN=$CN" -out "$WORK/server.csr"
openssl x509 -req -in "$WORK/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -CAserial "$WORK/ca.srl" -sha256 -days 825 -extfile "$WORK/server.ext" -out "$OUT/server.crt" 2>/dev/null
chmod 644 "$OUT/ca.crt" "$OUT/server.crt"
openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.crt" >/dev/null
echo "wrote $OUT/ca.crt $OUT/ca.key $OUT/server.crt $OUT/server.key (server names: $SAN)"
