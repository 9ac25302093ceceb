#!/usr/bin/env bash
# Development TLS material for a fopro-kd federation: a private CA and a SuperLink server
# certificate signed by it. NOT for production: a hospital network uses certificates from
# its own PKI. The server certificate's subjectAltName must cover the address the
# SuperNodes dial (default: IP:127.0.0.1, DNS:localhost).
#
#   deploy/make_dev_certs.sh [OUT_DIR] [EXTRA_SAN ...]
#   deploy/make_dev_certs.sh certs DNS:superlink.hospital.example IP:10.0.0.5
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key (private keys mode 600).
#   flower-superlink --ssl-ca-certfile OUT_DIR/ca.crt --ssl-certfile OUT_DIR/server.pem --ssl-keyfile OUT_DIR/server.key
#   flower-supernode --root-certificates OUT_DIR/ca.crt --superlink HOST:PORT ...
set -euo pipefail

OUT_DIR="${1:-deploy/certs}"
shift || true
DAYS="${CERT_DAYS:-365}"
SAN="IP:127.0.0.1,DNS:localhost"
for extra in "$@"; do
  case "$extra" in
    IP:*|DNS:*) SAN="${SAN},${extra}" ;;
    *) echo "make_dev_certs.sh: extra SAN '$extra' must start with IP: or DNS:" >&2; exit 2 ;;
  esac
done

command -v openssl >/dev/null || { echo "make_dev_certs.sh: openssl not found" >&2; exit 2; }
mkdir -p "$OUT_DIR"
umask 077

openssl genrsa -out "$OUT_DIR/ca.key" 4096 2>/dev/null
openssl req -x509 -new -nodes -key "$OUT_DIR/ca.key" -sha256 -days "$DAYS" \
  -subj "/CN=fopro-kd dev CA" -out "$OUT_DIR/ca.crt"

openssl genrsa -out "$OUT_DIR/server.key" 4096 2>/dev/null
openssl req -new -key "$OUT_DIR/server.key" -subj "/CN=fopro-kd superlink" -out "$OUT_DIR/server.csr"
EXT="$(mktemp)"
trap 'rm -f "$EXT" "$OUT_DIR/server.csr" "$OUT_DIR/ca.srl"' EXIT
cat > "$EXT" <<EXTEOF
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${SAN}
EXTEOF
openssl x509 -req -in "$OUT_DIR/server.csr" -CA "$OUT_DIR/ca.crt" -CAkey "$OUT_DIR/ca.key" \
  -CAcreateserial -days "$DAYS" -sha256 -extfile "$EXT" -out "$OUT_DIR/server.pem" 2>/dev/null

chmod 600 "$OUT_DIR/ca.key" "$OUT_DIR/server.key"
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.pem"
echo "wrote $OUT_DIR/{ca.crt,ca.key,server.pem,server.key} (SAN: $SAN)"
