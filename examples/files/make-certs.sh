#!/usr/bin/env bash
# Makes a throw-away SPIFFE trust domain with openssl, for trying
# spiffe-tunnel with file identities and no SPIRE:
#   ca.pem / ca.key             root CA of trust domain example.org (= bundle.pem)
#   web.pem / web.key           X509-SVID spiffe://example.org/web   (the caller)
#   api.pem / api.key           X509-SVID spiffe://example.org/api   (the server)
#   intruder.pem / intruder.key X509-SVID spiffe://example.org/intruder (not allowed)
# The SVIDs follow the X509-SVID spec as SPIRE issues them: one URI SAN,
# CA:FALSE, key usage digitalSignature (critical), EKU serverAuth+clientAuth,
# P-256 keys in PKCS#8. They live 24 hours.
#
# Usage: make-certs.sh [DIR]   (default: the certs/ folder next to this script)
set -euo pipefail
dir=${1:-"$(cd "$(dirname "$0")" && pwd)/certs"}
mkdir -p "$dir"
cd "$dir"

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.pem -days 30 -sha256 \
    -subj "/C=US/O=SPIFFE/CN=example.org test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectAltName=URI:spiffe://example.org" 2>/dev/null
cp ca.pem bundle.pem

svid() {
    local name=$1 id=$2
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "/C=US/O=SPIRE" 2>/dev/null
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement" \
        "extendedKeyUsage=serverAuth,clientAuth" \
        "subjectAltName=URI:$id" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key \
        -set_serial "0x$(openssl rand -hex 16)" -days 1 -sha256 \
        -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
    chmod 600 "$name.key"
    echo "$dir/$name.pem: $id"
}

svid web spiffe://example.org/web
svid api spiffe://example.org/api
svid intruder spiffe://example.org/intruder
