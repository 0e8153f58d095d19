"""Raw-socket probes against a running Bastion HTTP front end. Usage: rawprobe.py HOST PORT [KEY]"""

import socket
import sys
import time

HOST, PORT = sys.argv[1], int(sys.argv[2])
KEY = sys.argv[3] if len(sys.argv) > 3 else "bst_0000000000000000_" + "A" * 43


def talk(payload: bytes | list, *, wait=3.0, shut=False, delay=0.0):
    s = socket.create_connection((HOST, PORT))
    s.settimeout(wait)
    t0 = time.monotonic()
    try:
        parts = payload if isinstance(payload, list) else [payload]
        for p in parts:
            s.sendall(p)
            if delay:
                time.sleep(delay)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except OSError as e:
        return f"send error {e!r}"
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except TimeoutError:
        out += b"<timeout>"
    except OSError as e:
        out += f"<{e!r}>".encode()
    s.close()
    return f"{time.monotonic() - t0:.2f}s " + repr(out[:600])


AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
BODY = (
    b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,30],"data":['
    + b",".join([b"1"] * 30)
    + b"]}]}"
)
INF = b"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\n" + AUTH

cases = {
    "cl_and_te": INF + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_ok": INF
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + hex(len(BODY))[2:].encode()
    + b"\r\n"
    + BODY
    + b"\r\n0\r\n\r\n",
    "te_gzip_chunked": INF + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_identity": INF + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}",
    "te_chunked_twice": INF + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": INF + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "two_cl": INF + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
    "cl_neg": INF + b"Content-Length: -1\r\n\r\n",
    "cl_huge": INF + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "cl_plus": INF + b"Content-Length: +2\r\n\r\n{}",
    "cl_space_num": INF + b"Content-Length: 2 2\r\n\r\n{}",
    "cl_hex": INF + b"Content-Length: 0x2\r\n\r\n{}",
    "chunk_size_line_huge": INF
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"0" * 100000
    + b"1\r\nx\r\n0\r\n\r\n",
    "chunk_ext_flood": INF
    + b"Transfer-Encoding: chunked\r\n\r\n1;"
    + b"a=b;" * 200000
    + b"\r\nx\r\n0\r\n\r\n",
    "chunk_size_overflow": INF + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "trailer_flood": INF + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: y\r\n" * 50000 + b"\r\n",
    "expect_100": INF
    + b"Expect: 100-continue\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY,
    "expect_bogus": INF
    + b"Expect: 999-weird\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY,
    "http10_keepalive": b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /v2/health/live HTTP/1.0\r\n\r\n",
    "http09": b"GET /v2/health/live\r\n\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "bare_lf": b"GET /v2/health/live HTTP/1.1\nHost: x\n\n",
    "obs_fold": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "nul_in_header": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space_before_colon": INF + b"Content-Length : 2\r\n\r\n{}",
    "absolute_uri": b"GET http://evil/v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n",
    "long_url": b"GET /" + b"a" * 60000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long_method": b"A" * 60000 + b" / HTTP/1.1\r\n\r\n",
    "pipeline_flood": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 2000,
    "smuggle_cl_te_get": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\n\r\nGET /v2/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "many_small_headers_under": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"a:b\r\n" * 99 + b"\r\n",
    "many_small_headers_over": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"a:b\r\n" * 1000 + b"\r\n",
    "empty_header_names": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b":\r\n" * 1000 + b"\r\n",
    "upgrade_h2c": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    "upgrade_ws": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "half_close_after_head": (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", "shut"),
    "content_encoding_gzip_bad": INF + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd",
    "content_encoding_unknown": INF + b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    "get_with_body_te": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "unknown_method": b"FOO /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "no_host_11": b"GET /v2/health/live HTTP/1.1\r\n\r\n",
    "dup_host": b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "path_traversal": b"GET /v2/../v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded_path": b"GET /v2/health/%6c%69%76%65 HTTP/1.1\r\nHost: x\r\n\r\n",
    "double_slash": b"GET //v2//health//live HTTP/1.1\r\nHost: x\r\n\r\n",
    "head_method": b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "xff_spoof": b"GET /v2/models HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
}
only = sys.argv[4:]
for name, payload in cases.items():
    if only and name not in only:
        continue
    shut = False
    if isinstance(payload, tuple):
        payload, shut = payload[0], True
    print(f"{name}: {talk(payload, shut=shut)}", flush=True)
