#!/bin/sh
# F4: a key released (admin API or CLI) leaves its incident 'contained' with no trace of the release in
# the incident's timeline or export; the CLI's release is in no audit record either.
# usage: URL=... ADMIN=bst_... CFG=.../bastion.toml ID=<incident id> KEY=<quarantined key id> sh release_timeline.sh
set -e
B=${B:-.venv/bin/bastion}
curl -s -H "Authorization: Bearer $ADMIN" -X POST "$URL/v2/admin/keys/$KEY/release"; echo
$B incidents export "$ID" --config "$CFG" | sed -n '/## Timeline/,$p'
$B audit export --config "$CFG" | grep -c '"route":"key_release"' || true
