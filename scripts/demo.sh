#!/usr/bin/env bash
# The ticketguard demo on the bundled digits data: find a ticket, sign it, verify it.
# Re-running continues (or reuses) the previous run in the same folder.
set -euo pipefail
out=${1:-demo-out}
tg=".venv/bin/ticketguard"
mkdir -p "$out"

echo "== 1. Find a lottery ticket: 10 rounds of 20% global magnitude pruning on digits =="
"$tg" find --out "$out/run" --rounds 10 --rewind 1ep --resume

echo
echo "== 2. Inspect the ticket, measure its test accuracy, export its topology graph =="
"$tg" inspect "$out/run/final.ticket" --eval digits --graph "$out/ticket.graphml"

echo
echo "== 3. Make the owner's key pair (kept if it exists) =="
if [ -e "$out/alice.key" ]; then
    echo "$out/alice.key exists; reusing it"
else
    "$tg" keygen --owner alice@example.org --out "$out/alice"
fi

echo
echo "== 4. Sign the ticket: a 512-bit Ed25519 signature written into its mask topology (W2)"
echo "       and a generated trigger set of 100 abstract images learnt by the ticket (B1) =="
"$tg" sign "$out/run/final.ticket" --key "$out/alice.key" --out "$out/signed.ticket" --force \
    --trigger generate

echo
echo "== 5. The owner verifies the signed ticket with the private key =="
"$tg" verify "$out/signed.ticket" --credential "$out/signed.cred.json" --key "$out/alice.key"

echo
echo "== 6. A judge verifies with the revealed seed and the owner's ticket (W2 + W1, aligned) =="
"$tg" verify "$out/signed.ticket" --credential "$out/signed.cred.json" \
    --reveal "$out/signed.secret.json" --reference "$out/signed.ticket" --public-key "$out/alice.pub"

echo
echo "== 7. The unsigned ticket does not carry the signature (exit code 1 expected) =="
if "$tg" verify "$out/run/final.ticket" --credential "$out/signed.cred.json" --key "$out/alice.key"; then
    echo "unexpected: the unsigned ticket verified" >&2
    exit 1
fi

echo
echo "== 8. Black box: serve the signed model over HTTP and verify it by querying the trigger set =="
"$tg" serve "$out/signed.ticket" --host 127.0.0.1 --port 0 > "$out/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 600); do
    url=$(grep -o 'http://[^ ]*' "$out/serve.log" | head -n 1 || true)
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not start" >&2; exit 1; }
head -n 1 "$out/serve.log"
"$tg" verify --endpoint "$url/predict" --credential "$out/signed.cred.json" --key "$out/alice.key"
kill "$server"
wait "$server" || true
trap - EXIT

echo
echo "== 9. White box and black box together: the signed file, read and queried =="
"$tg" verify "$out/signed.ticket" --blackbox --credential "$out/signed.cred.json" \
    --key "$out/alice.key"

echo
echo "== 10. The paper's visual scheme: a QR code in one layer's connectivity (W3), and its pictures =="
"$tg" sign "$out/run/final.ticket" --key "$out/alice.key" --out "$out/qr.ticket" --force \
    --scheme qr --qr-text "alice@example.org"
"$tg" verify "$out/qr.ticket" --credential "$out/qr.cred.json" --key "$out/alice.key"
rm -rf "$out/pictures"
"$tg" render "$out/qr.ticket" --credential "$out/qr.cred.json" --out "$out/pictures"

echo
echo "== 11. An extreme ticket: remove 300 magnitude-weighted paths and retrain =="
"$tg" thin "$out/signed.ticket" --paths 300 --out "$out/extreme.ticket" --force

echo
echo "== 12. Attack the signed ticket: the default robustness benchmark (fine-tuning, pruning, regrowth,"
echo "       noise, quantisation, weight shifting, permutation, distillation, overwriting, forging,"
echo "       key search, fake trigger sets), each cell verified as a judge would =="
"$tg" bench configs/digits-bench.toml --out "$out/bench" --ticket "$out/signed.ticket" \
    --credential "$out/signed.cred.json" --secret "$out/signed.secret.json"

echo
echo "== 13. A thief signs the stolen ticket with their own key (a forged claim) =="
"$tg" attack forge "$out/signed.ticket" --owner mallory@example.org --out "$out/forged.ticket" --force

echo
echo "== 14. The dispute: every claim checked against every model; the original carries one mark =="
"$tg" dispute --claim "$out/signed.cred.json" "$out/signed.secret.json" "$out/signed.ticket" \
    --claim "$out/forged.cred.json" "$out/forged.secret.json" "$out/forged.ticket"

echo
echo "Outputs in $out: run/ (final.ticket, rounds/, log.json), ticket.graphml, alice.key/.pub,"
echo "signed.ticket, signed.cred.json, signed.secret.json (seed and trigger set), qr.ticket (+ .cred.json,"
echo ".secret.json), pictures/ (connectivity.png, qr.png, comparison.png), extreme.ticket,"
echo "forged.ticket (+ .cred.json, .secret.json), bench/ (results.csv, results.json, plots.png)"
echo
echo "The benchmark report: $out/bench/report.html (and $out/bench/report.md)"
