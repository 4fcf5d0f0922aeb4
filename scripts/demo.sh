#!/usr/bin/env bash
# The ticketguard demo on the bundled digits data: find a ticket, then inspect it.
# Re-running continues (or reuses) the previous run in the same folder.
set -euo pipefail
out=${1:-demo-out}
tg=".venv/bin/ticketguard"
mkdir -p "$out"

echo "== 1. Find a lottery ticket: 10 rounds of 20% global magnitude pruning on digits =="
"$tg" find --out "$out/run" --rounds 10 --rewind 1ep --resume

echo
echo "== 2. Inspect the ticket and measure its test accuracy =="
"$tg" inspect "$out/run/final.ticket" --eval digits

echo
echo "Run folder: $out/run (final.ticket, rounds/, log.json, config.json)"
