#!/usr/bin/env bash
# SuperNode authentication keys (Flower 1.42 "CLI-managed" SuperNode authentication): one ECDSA
# P-384 key pair per hospital. The private key never leaves the hospital; the coordinator registers
# only the public key, and a SuperLink started with --enable-supernode-auth refuses every SuperNode
# whose key was not registered (docs/federation.md §4.3).
#
#   deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]
#   deploy/make_node_keys.sh keys site-0 site-1
#
# Writes OUT_DIR/NAME (private, mode 600) and OUT_DIR/NAME.pub for every NAME, then prints the
# commands that use them:
#   flwr supernode register OUT_DIR/NAME.pub <connection>            # coordinator, once per hospital
#   flower-supernode ... --auth-supernode-private-key OUT_DIR/NAME   # the hospital
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]" >&2
  exit 2
fi
OUT_DIR="$1"
shift
command -v ssh-keygen >/dev/null || { echo "make_node_keys.sh: ssh-keygen not found" >&2; exit 2; }
mkdir -p "$OUT_DIR"
umask 077
for name in "$@"; do
  case "$name" in
    *[!A-Za-z0-9._-]*|"") echo "make_node_keys.sh: key name '$name' must be letters, digits, '.', '_' or '-'" >&2; exit 2 ;;
  esac
  if [ -e "$OUT_DIR/$name" ]; then
    echo "make_node_keys.sh: $OUT_DIR/$name exists; not overwriting a hospital's key" >&2
    exit 2
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fopro-kd $name" -f "$OUT_DIR/$name"
  echo "flwr supernode register $OUT_DIR/$name.pub <connection>"
  echo "flower-supernode ... --auth-supernode-private-key $OUT_DIR/$name"
done
