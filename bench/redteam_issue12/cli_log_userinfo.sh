#!/bin/sh
# F6: bastion status logs each request's URL through an unredacted handler: credentials in the URL
# (userinfo) are printed to stderr three times, while the tool's own output redacts them.
# usage: URL_HOSTPORT=127.0.0.1:8000 ADMIN=bst_... sh cli_log_userinfo.sh
B=${B:-.venv/bin/bastion}
$B status --url "http://ops:s3cretPW@$URL_HOSTPORT" --key env:ADMIN 2>&1 | grep -c s3cretPW
