"""Connections in their body phase, attacked over raw sockets (red team of issue #9, F1).

A request answered before its body arrived (401 without credentials, 429, 404...) used to keep its
connection in the front end's body phase while the client dripped the body it declared, for
body_timeout, and a body-phase connection was never evicted: max_connections such sockets, sent
without any credential, and every new connection (health probes included) was closed by the server.

The server here has a small connection cap and a long body deadline, so that the cap, not the
deadline, is what the attack meets.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from bastion.demo import infer_request
from bastion.http.frontend import LINGER_SECONDS
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

MAX_CONNECTIONS = 16
BODY_TIMEOUT = 30.0

SETTINGS = f"""
body_timeout_seconds = {BODY_TIMEOUT}
max_connections = {MAX_CONNECTIONS}
"""


@dataclass
class Server:
    server: RunningServer
    key: str
    host: str
    port: int
    body: bytes

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=5)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("bodyphase")
    config, build = write_test_deployment(root)
    text = config.read_text().replace('state_dir = "state"\n', f'state_dir = "state"\n{SETTINGS}', 1)
    assert SETTINGS in text
    config.write_text(text)
    key = create_key(config, "loader")
    server = start_server(config, root / "server.log")
    host, port = server.base_url.removeprefix("http://").split(":")
    body = json.dumps(infer_request(build.features[:1])).encode()
    yield Server(server, key, host, int(port), body)
    server.stop()


def head(
    path: str = "/v2/models/breast-cancer/infer", key: str | None = None, length: int = 100_000
) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n\r\n".encode()


def read_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {
        k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])
    }


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"a") -> float | None:
    """Drip `drip` every 0.2 s (the body the head declared) until the server closes; seconds it took,
    or None if still open after `seconds`."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            sock.sendall(drip)
            while sock.recv(65536):
                pass
            return time.monotonic() - t0  # EOF
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return time.monotonic() - t0
    return None


def health(srv: Server) -> int:
    try:
        return httpx.get(f"{srv.server.base_url}/v2/health/live", timeout=3).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.parametrize(
    "path",
    ["/v2/models/breast-cancer/infer", "/v2/auth/token", "/v2/nope", "/v2/health/live"],
)
def test_an_answer_before_the_body_ends_closes_the_connection(srv: Server, path: str) -> None:
    with srv.connect() as sock:
        sock.sendall(head(path) + b"{")
        status, headers = read_head(sock)
        assert status in (401, 404, 405)  # /v2/health/live answers GET only (405 at once: no body read)
        assert headers.get("connection") == "close"  # a pooling client does not reuse it
        # The rest of the body is read and dropped for a moment (lingering close), not for body_timeout.
        took = closed_within(sock, BODY_TIMEOUT / 2)
        assert took is not None and took < LINGER_SECONDS + 3, took


def test_body_phase_connections_without_credentials_do_not_take_the_server_out(srv: Server) -> None:
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS * 3):
            sock = srv.connect()
            sock.sendall(head() + b"{")
            socks.append(sock)
        time.sleep(0.3)
        for _ in range(5):
            assert health(srv) == 200
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()


def test_keyed_slow_bodies_past_the_connection_cap_do_not_keep_new_connections_out(srv: Server) -> None:
    # Each request is authenticated and being read by the application (not answered early): past the
    # cap the oldest of them is evicted, so a new connection (a probe, another client) always gets in.
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 4):
            sock = srv.connect()
            sock.sendall(head(key=srv.key, length=len(srv.body)) + srv.body[:5])
            socks.append(sock)
            time.sleep(0.02)
        time.sleep(0.3)
        assert health(srv) == 200
        response = httpx.post(
            f"{srv.server.base_url}/v2/models/breast-cancer/infer",
            content=srv.body,
            headers={"Authorization": f"Bearer {srv.key}"},
            timeout=5,
        )
        assert response.status_code == 200, response.text
    finally:
        for sock in socks:
            sock.close()


def test_a_flood_of_refused_requests_does_not_grow_the_log_with_it(srv: Server) -> None:
    """Red team #9 F4: each front-end refusal (here 400 malformed_http, without credentials) wrote one
    log line; now at most a few lines a window, the rest counted."""
    log = srv.server.log_path
    start = log.stat().st_size
    for _ in range(300):
        with srv.connect() as sock:
            sock.sendall(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_head(sock)[0] == 400
    time.sleep(0.3)
    with log.open("rb") as f:
        f.seek(start)
        lines = [
            line for line in f.read().splitlines() if b"front end refused a request: malformed_http" in line
        ]
    assert 1 <= len(lines) <= 12, len(lines)


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"x-custom , chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused(srv: Server, coding: bytes) -> None:
    """Red team #9 F6: `Transfer-Encoding: gzip, chunked` was de-chunked and the gzip coding ignored
    (the body reached the application still coded): a coding accepted and ignored."""
    with srv.connect() as sock:
        sock.sendall(
            b"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + srv.key.encode()
            + b"\r\nTransfer-Encoding: "
            + coding
            + b"\r\n\r\n"
            + b"%x\r\n" % len(srv.body)
            + srv.body
            + b"\r\n0\r\n\r\n"
        )
        status, headers = read_head(sock)
    assert status == 400 and headers.get("connection") == "close"


def test_chunked_alone_is_served(srv: Server) -> None:
    with srv.connect() as sock:
        sock.sendall(
            b"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + srv.key.encode()
            + b"\r\nTransfer-Encoding: Chunked\r\n\r\n"
            + b"%x\r\n" % len(srv.body)
            + srv.body
            + b"\r\n0\r\n\r\n"
        )
        assert read_head(sock)[0] == 200


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_the_probes_answer_head(srv: Server, path: str) -> None:
    """Red team #9 F9: HEAD on the probes was 405 once they answered GET only; a load balancer probing
    with HEAD (HAProxy `option httpchk HEAD ...`) took every replica out."""
    with srv.connect() as sock:
        sock.sendall(
            f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\nGET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = b""
        sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head
    assert rest.startswith(b"HTTP/1.1 200")  # no body after the HEAD answer: the GET's answer follows


def test_past_the_cap_a_closing_connection_goes_before_an_upload_in_progress(srv: Server) -> None:
    """Answered connections lingering (F1's close) are evicted before a keyed upload still sending its
    body: otherwise a flood of quick 401s, each lingering up to 2 s, pushed out the oldest real upload."""
    upload = srv.connect()
    anonymous: list[socket.socket] = []
    try:
        upload.sendall(head(key=srv.key, length=len(srv.body)) + srv.body[:5])
        time.sleep(0.2)
        for _ in range(MAX_CONNECTIONS - 1):
            sock = srv.connect()
            sock.sendall(head() + b"{")
            anonymous.append(sock)
        for sock in anonymous:
            assert read_head(sock)[0] == 401  # answered: now lingering, reading what still comes
            sock.sendall(b" ")
        assert health(srv) == 200  # a new connection past the cap
        upload.sendall(srv.body[5:])
        upload.settimeout(5)
        assert read_head(upload)[0] == 200
    finally:
        upload.close()
        for sock in anonymous:
            sock.close()
