"""TLS and client certificates on the real `bastion serve`, REST and gRPC, attacked from the client side.

Two servers for the module, each started once: "optional" client certificates (mapping, refusals,
reload, handshake deadline), and "require" (gRPC maps certificates; certificates that expire or lose
their CA on an open connection). Both allow TLS 1.2: `min_version = "1.3"` is refused with gRPC enabled
(grpcio cannot enforce it) and shown on REST in tests/unit/test_tls.py. Every certificate is made by
the tests (tests/pki.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from tritonclient.utils import InferenceServerException

from bastion.demo import infer_request
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from tests.helpers import BASTION, RunningServer, create_key, free_port, run_cli, write_test_deployment
from tests.pki import SPIFFE_SCORER, Authority, Issued, malleate

HEAD_TIMEOUT = 1.5
RELOAD_INTERVAL = 0.3
MAX_IN_FLIGHT = 4  # anything wrongly counted as load (a handshake in progress) would shed requests
SERVER_SETTINGS = f"head_timeout_seconds = {HEAD_TIMEOUT}\nmax_concurrent_requests = {MAX_IN_FLIGHT}\n"
ONNX = "breast-cancer"


@dataclass
class Pki:
    ca: Authority
    server: Issued
    server2: Issued
    ingest: Issued  # subject CN=ingest,O=Bastion Tests: the analyst role
    scorer: Issued  # SPIFFE ID: the admin role
    stranger: Issued  # valid, from the CA, mapped to no one
    revoked: Issued  # subject CN=ingest too, but its public key is revoked
    twin: Issued  # `revoked` re-encoded by its holder (ECDSA (r, n - s)): another DER, the same key
    expired: Issued  # CN=ingest, expired
    foreign: Issued  # CN=ingest from another CA
    metered: Issued  # CN=metered: the quota role (a daily quota of 2)


@dataclass
class TlsServer:
    server: RunningServer
    config: Path
    root: Path
    port: int
    grpc_port: int
    pki: Pki
    keys: dict[str, str]
    rows: np.ndarray

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self, client: Issued | None = None, **options: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.pki.ca.pem)
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        for name, value in options.items():
            setattr(ctx, name, value)
        return ctx

    def client(self, cert: Issued | None = None, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, verify=self.context(cert), headers=headers, timeout=10)

    def infer(self, cert: Issued | None = None, key: str | None = None) -> httpx.Response:
        with self.client(cert, key) as http:
            return http.post(f"/v2/models/{ONNX}/infer", json=infer_request(self.rows))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = Authority(root, "test"), Authority(root, "other")
    revoked = ca.issue("revoked", cn="ingest")
    twin_pem = root / "revoked-twin.pem"
    twin_pem.write_bytes(malleate(revoked.cert.read_bytes()))
    return Pki(
        ca=ca,
        server=ca.issue("server", cn="127.0.0.1", server=True),
        server2=ca.issue("server2", cn="127.0.0.1", server=True),
        ingest=ca.issue("ingest", cn="ingest"),
        scorer=ca.issue("scorer", cn="scorer-workload", spiffe_id=SPIFFE_SCORER),
        stranger=ca.issue("stranger", cn="stranger"),
        revoked=revoked,
        twin=Issued(twin_pem, revoked.key, revoked.serial, "", revoked.public_key_sha256),
        expired=ca.issue("expired", cn="ingest", expired=True),
        foreign=other.issue("foreign", cn="ingest"),
        metered=ca.issue("metered", cn="metered"),
    )


@dataclass
class Deployment:
    root: Path
    keys: dict[str, str]
    rows: np.ndarray


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Deployment:
    """One deployment (models, bundles, keys) that each server copies: built once for the module."""
    root = tmp_path_factory.mktemp("tls") / "base"
    extra = f"""
[server.tls]
cert_file = "tls/server.pem"
key_file = "tls/server.key"
client_ca_file = "tls/ca.pem"
client_auth = "optional"
min_version = "1.2"
reload_interval_seconds = {RELOAD_INTERVAL}

[grpc]
enabled = true
port = 1

[client_certificates]
revoked_public_keys = ["{pki.revoked.public_key_sha256}"]

[[client_certificates.identities]]
name = "ingest"
subject = "CN=ingest,O=Bastion Tests"
roles = ["analyst"]

[[client_certificates.identities]]
name = "scorer"
spiffe_id = "{SPIFFE_SCORER}"
roles = ["admin"]

[[client_certificates.identities]]
name = "metered"
subject = "CN=metered,O=Bastion Tests"
roles = ["quota"]

"""
    config, build = write_test_deployment(root, extra=extra)
    config.write_text(config.read_text().replace("[server]\n", f"[server]\n{SERVER_SETTINGS}", 1))
    tls_dir = root / "tls"
    tls_dir.mkdir()
    for src, name in (
        (pki.server.cert, "server.pem"),
        (pki.server.key, "server.key"),
        (pki.ca.pem, "ca.pem"),
    ):
        shutil.copy(src, tls_dir / name)
    keys = {role: create_key(config, role) for role in ("analyst", "admin")}
    return Deployment(root, keys, np.asarray(build.features[:2], dtype=np.float32))


def _start(base: Deployment, root: Path, pki: Pki, *, client_auth: str, min_version: str) -> TlsServer:
    shutil.copytree(base.root, root)
    config = root / "bastion.toml"
    port, grpc_port = free_port(), free_port()
    text = config.read_text().replace('client_auth = "optional"', f'client_auth = "{client_auth}"')
    text = text.replace('min_version = "1.2"', f'min_version = "{min_version}"')
    config.write_text(text.replace("\nport = 1\n", f"\nport = {grpc_port}\n"))
    log = root / "server.log"
    process = subprocess.Popen(
        [*BASTION, "serve", "--config", str(config), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = RunningServer(f"https://127.0.0.1:{port}", config, process, log)
    found = TlsServer(server, config, root, port, grpc_port, pki, base.keys, base.rows)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()}")
        try:
            # "require" needs a certificate even for health: the stranger's is valid and names no one.
            with httpx.Client(verify=found.context(pki.stranger), timeout=1) as http:
                if http.get(f"{found.url}/v2/health/ready").status_code == 200:
                    return found
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not start in 60 s: {log.read_text()}")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, deployment: Deployment, pki: Pki) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("optional") / "d"
    running = _start(deployment, root, pki, client_auth="optional", min_version="1.2")
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, deployment: Deployment, pki: Pki) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("require") / "d"
    running = _start(deployment, root, pki, client_auth="require", min_version="1.2")
    yield running
    running.server.stop()


def _handshake(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _served_serial(t: TlsServer) -> int:
    with _handshake(t.context(), t.port) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _audit(t: TlsServer) -> list[dict[str, Any]]:
    out = run_cli("audit", "export", "--config", t.config).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- HTTPS -------------------------------------------------------------------------------------------


def test_https_serves_keys_over_tls_and_plaintext_gets_no_answer(tls: TlsServer) -> None:
    answer = tls.infer(key="analyst")
    assert answer.status_code == 200 and answer.json()["outputs"][0]["name"] == "label"
    with tls.client() as http:
        assert http.get("/v2/models").status_code == 401  # TLS changes nothing about identity
    with pytest.raises(httpx.TransportError):  # plaintext HTTP to the TLS port: no HTTP answer at all
        httpx.get(f"http://127.0.0.1:{tls.port}/v2/health/live", timeout=5)
    with pytest.raises(httpx.ConnectError):  # and a client that does not trust the test CA refuses it
        httpx.get(f"{tls.url}/v2/health/live", timeout=5)


def _refused_by_the_server(error: ssl.SSLError) -> bool:
    """The server ended the handshake (its alert, or a close mid-handshake), not the client's own refusal."""
    return isinstance(error, ssl.SSLEOFError) or "ALERT" in str(error)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused_by_the_server(tls: TlsServer, version: ssl.TLSVersion) -> None:
    ctx = tls.context(minimum_version=version, maximum_version=version)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client must be willing: then the refusal is the server's
    with pytest.raises(ssl.SSLError) as err:
        _handshake(ctx, tls.port)
    assert _refused_by_the_server(err.value), err.value


@pytest.mark.parametrize(
    "cipher",
    [
        "ECDHE-ECDSA-AES128-SHA",  # ECDHE but CBC: no AEAD
        "ECDHE-ECDSA-AES256-SHA384",  # ECDHE, CBC with SHA-384
        "AES128-GCM-SHA256",  # AEAD but static RSA key exchange: no forward secrecy
        "DHE-RSA-AES128-GCM-SHA256",  # finite-field DHE
    ],
)
def test_tls_1_2_without_ecdhe_and_aead_is_refused(tls: TlsServer, cipher: str) -> None:
    ctx = tls.context(maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(cipher + ":@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as err:
        _handshake(ctx, tls.port)
    assert _refused_by_the_server(err.value), err.value


def test_tls_1_2_with_ecdhe_and_aead_and_tls_1_3_are_served(tls: TlsServer) -> None:
    for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        ctx = tls.context(maximum_version=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(cipher)
        with _handshake(ctx, tls.port) as conn:
            assert conn.version() == "TLSv1.2" and conn.cipher()[0] == cipher  # type: ignore[index]
    with _handshake(tls.context(), tls.port) as conn:
        assert conn.version() == "TLSv1.3"


# -- Client certificates -----------------------------------------------------------------------------


def test_client_certificates_map_to_their_principals_and_roles(tls: TlsServer) -> None:
    pki = tls.pki
    # By subject: the analyst role, labels only, with no bearer secret at all.
    answer = tls.infer(pki.ingest)
    assert answer.status_code == 200
    assert [o["name"] for o in answer.json()["outputs"]] == ["label"]
    with tls.client(pki.ingest) as http:
        assert http.get("/metrics").status_code == 403  # the analyst role has no admin grant
    # By SPIFFE ID: the admin role, full scores and metrics.
    answer = tls.infer(pki.scorer)
    assert answer.status_code == 200
    assert {o["name"] for o in answer.json()["outputs"]} == {"label", "probabilities"}
    with tls.client(pki.scorer) as http:
        assert http.get("/metrics").status_code == 200
        # A service identity mints no token: the token route takes API keys only.
        assert http.post("/v2/auth/token", json={}).status_code == 401


def test_a_certificate_principal_has_its_roles_limits(tls: TlsServer) -> None:
    """The same limits as a key: the quota role's daily quota of 2, counted for cert:metered."""
    assert [tls.infer(tls.pki.metered).status_code for _ in range(3)] == [200, 200, 429]
    assert tls.infer(tls.pki.ingest).status_code == 200  # another principal's quota is its own


def test_unmapped_revoked_and_doubly_credentialed_certificates_get_nothing(tls: TlsServer) -> None:
    pki = tls.pki
    assert tls.infer(pki.stranger).status_code == 401  # valid for the CA, named by no identity
    assert tls.infer(pki.revoked).status_code == 401  # its subject maps, its public key is revoked
    # Re-encoded by its holder: another DER (another SHA-256 of the certificate), the same public key.
    assert pki.twin.cert.read_bytes() != pki.revoked.cert.read_bytes()
    assert tls.infer(pki.twin).status_code == 401
    assert tls.infer().status_code == 401  # no certificate, no key
    # A mapped certificate and a bearer key: two principals, refused rather than one chosen.
    answer = tls.infer(pki.ingest, key="admin")
    assert answer.status_code == 401 and answer.json()["code"] == "unauthenticated"
    # An unmapped certificate is no credential: the key decides.
    assert tls.infer(pki.stranger, key="admin").status_code == 200


@pytest.mark.parametrize("which", ["foreign", "expired", "server"])
def test_certificates_from_another_ca_or_expired_fail_the_handshake(tls: TlsServer, which: str) -> None:
    """Another CA's certificate (same subject), an expired one, and one of the CA's own that is for
    servers only (extended key usage serverAuth: a server's certificate is no client's)."""
    cert = getattr(tls.pki, which)
    # TLS 1.3 reports the client certificate's rejection after the client's side of the handshake:
    # the refusal arrives as an alert on the first read, and no HTTP answer ever does.
    with pytest.raises(httpx.TransportError):
        tls.infer(cert)
    # TLS 1.2: the server ends the handshake itself.
    ctx = tls.context(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError) as err:
        _handshake(ctx, tls.port)
    assert _refused_by_the_server(err.value), err.value
    assert tls.infer(tls.pki.ingest).status_code == 200  # the same subject from the right CA, in date


def test_the_audit_names_the_certificate_principal_and_public_key_never_the_certificate(
    tls: TlsServer,
) -> None:
    pki = tls.pki
    ok = tls.infer(pki.ingest)
    refused = tls.infer(pki.stranger)
    records = {r.get("request_id"): r for r in _audit(tls)}
    served = records[ok.headers["x-request-id"]]
    assert served["principal"] == "cert:ingest" and served["via"] == "certificate"
    # A stable id (the public key's SHA-256), not the DER's hash its holder can change by re-encoding.
    assert served["certificate"] == pki.ingest.public_key_sha256
    denied = records[refused.headers["x-request-id"]]
    assert denied["principal"] is None and denied["certificate"] == pki.stranger.public_key_sha256
    # Neither the certificate nor its key is written anywhere the server writes.
    pem_body = "".join(pki.ingest.cert.read_text().splitlines()[1:-1])
    key_body = "".join(pki.ingest.key.read_text().splitlines()[1:-1])
    for path in [*tls.root.joinpath("state").rglob("*"), tls.server.log_path]:
        if path.is_file():
            data = path.read_bytes()
            assert pem_body[:64].encode() not in data and key_body[:64].encode() not in data, path


def test_a_quarantined_or_revoked_service_identity_is_refused_and_released(tls: TlsServer) -> None:
    # What query auditing does on suspicion (the key store's quarantine), by the operator's command here.
    from bastion.keys import KeyStore

    store = KeyStore(tls.root / "state" / "keys.db")
    try:
        assert store.quarantine("cert:scorer", now=time.time())
    finally:
        store.close()
    refused = tls.infer(tls.pki.scorer)
    assert refused.status_code == 403 and refused.json()["code"] == "key_quarantined"
    out = run_cli("keys", "release", "--config", tls.config, "cert:scorer").stdout
    assert "released cert:scorer" in out
    assert tls.infer(tls.pki.scorer).status_code == 200
    run_cli("keys", "revoke", "--config", tls.config, "cert:scorer")
    assert tls.infer(tls.pki.scorer).status_code == 401
    assert tls.infer(tls.pki.ingest).status_code == 200  # the other identity is untouched


def test_start_up_refuses_a_key_that_is_not_the_certificates_naming_the_field(
    deployment: Deployment, pki: Pki, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    shutil.copytree(deployment.root, root)
    shutil.copy(pki.server2.key, root / "tls" / "server.key")
    for command in ("serve", "check"):
        result = run_cli(command, "--config", root / "bastion.toml", check=False)
        assert result.returncode == 2, result.stderr
        assert "server.tls.key_file:" in result.stderr and "is not the key of" in result.stderr
        assert "Traceback" not in result.stderr and "PRIVATE KEY" not in result.stderr


# -- The handshake's own deadline --------------------------------------------------------------------


def test_a_handshake_that_never_completes_is_closed_after_the_head_timeout(tls: TlsServer) -> None:
    # More silent sockets than max_concurrent_requests: were a handshake load, the requests below would shed.
    silent = [
        socket.create_connection(("127.0.0.1", tls.port), timeout=10) for _ in range(10 * MAX_IN_FLIGHT)
    ]
    partial = socket.create_connection(("127.0.0.1", tls.port), timeout=10)
    partial.sendall(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    )  # a ClientHello's first bytes, then nothing
    started = time.monotonic()
    try:
        # Meanwhile the server answers: handshakes in progress are not load.
        with tls.client() as http:
            assert http.get("/v2/health/ready", timeout=2).status_code == 200
        assert tls.infer(key="analyst").status_code == 200
        for conn in [*silent, partial]:
            with contextlib.suppress(ConnectionResetError):  # a reset is a close too
                assert conn.recv(1024) == b""  # closed by the server, nothing sent
        waited = time.monotonic() - started
        assert HEAD_TIMEOUT - 0.5 <= waited <= HEAD_TIMEOUT + 3, waited
    finally:
        for conn in [*silent, partial]:
            conn.close()


# -- gRPC --------------------------------------------------------------------------------------------


def _triton(t: TlsServer, cert: Issued | None = None) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        f"127.0.0.1:{t.grpc_port}",
        ssl=True,
        root_certificates=str(t.pki.ca.pem),
        private_key=None if cert is None else str(cert.key),
        certificate_chain=None if cert is None else str(cert.cert),
    )


def _grpc_input(rows: np.ndarray) -> triton.InferInput:
    features = triton.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows)
    return features


def test_grpc_over_tls_serves_keys_and_refuses_plaintext(tls: TlsServer) -> None:
    client = _triton(tls)
    assert client.is_server_live()
    result = client.infer(
        ONNX, [_grpc_input(tls.rows)], headers={"authorization": f"Bearer {tls.keys['analyst']}"}
    )
    assert result.as_numpy("label").shape == (2,)
    with pytest.raises(InferenceServerException):
        client.infer(ONNX, [_grpc_input(tls.rows)])  # no credential: UNAUTHENTICATED
    # With client_auth = "optional", gRPC asks for no client certificate (its Python API can only require
    # one or not ask): a certificate identity is not a principal over gRPC there, a key is needed.
    with pytest.raises(InferenceServerException) as err:
        _triton(tls, tls.pki.scorer).infer(ONNX, [_grpc_input(tls.rows)])
    assert "401" in str(err.value) or "UNAUTHENTICATED" in str(err.value)
    assert "certificate identities apply to REST only" in tls.server.log_path.read_text()  # said at start
    with grpc.insecure_channel(f"127.0.0.1:{tls.grpc_port}") as channel, pytest.raises(grpc.RpcError) as err:
        GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_grpc_follows_a_certificate_reload_and_so_does_rest(tls: TlsServer) -> None:
    """Placed last among the "optional" server's tests: it swaps the server certificate (and puts it back)."""
    pki = tls.pki
    assert _served_serial(tls) == pki.server.serial
    with tls.client(key="analyst") as kept:  # a connection opened before the renewal
        assert kept.get("/v2/health/live").status_code == 200
        tls_dir = tls.root / "tls"
        shutil.copy(pki.server2.cert, tls_dir / "server.pem")
        shutil.copy(pki.server2.key, tls_dir / "server.key")
        deadline = time.monotonic() + 10
        while _served_serial(tls) != pki.server2.serial and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _served_serial(tls) == pki.server2.serial  # a new connection sees the new certificate
        assert kept.get("/v2/health/live").status_code == 200  # the open one goes on
    # gRPC, on a new channel, is handed the new certificate too.
    pem = ssl.get_server_certificate(("127.0.0.1", tls.grpc_port), ca_certs=str(pki.ca.pem))
    assert x509.load_pem_x509_certificate(pem.encode()).serial_number == pki.server2.serial
    assert _triton(tls).is_server_live()
    # A half-written renewal (a certificate without its key) is refused; the working pair keeps serving.
    shutil.copy(pki.server.cert, tls.root / "tls" / "server.pem")
    time.sleep(RELOAD_INTERVAL * 4)
    assert _served_serial(tls) == pki.server2.serial
    assert "TLS reload refused" in tls.server.log_path.read_text()
    # SIGHUP reloads at once, whatever the timer; the policy too: an identity removed from it is revoked.
    shutil.copy(pki.server.key, tls.root / "tls" / "server.key")
    text = tls.config.read_text()
    metered = '[[client_certificates.identities]]\nname = "metered"\nsubject = "CN=metered,O=Bastion Tests"\n'
    assert metered in text
    tls.config.write_text(text.replace(metered + 'roles = ["quota"]\n', ""))
    assert tls.infer(pki.metered).status_code == 429  # still mapped (over its quota) before the reload
    tls.server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _served_serial(tls) != pki.server.serial and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _served_serial(tls) == pki.server.serial
    deadline = time.monotonic() + 30  # the policy reload re-verifies every model first
    while (status := tls.infer(pki.metered).status_code) != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 401
    assert tls.infer(pki.ingest).status_code == 200


# -- client_auth = "require" ---------------------------------------------------------------------------


def test_require_refuses_a_connection_without_a_valid_certificate(strict: TlsServer) -> None:
    with pytest.raises(httpx.TransportError):
        strict.infer(key="analyst")  # a key is not enough: the connection needs a certificate
    assert strict.infer(strict.pki.ingest).status_code == 200


def test_grpc_with_require_maps_a_spiffe_certificate_and_refuses_none(strict: TlsServer) -> None:
    client = _triton(strict, strict.pki.scorer)
    result = client.infer(ONNX, [_grpc_input(strict.rows)])  # no bearer: the SPIFFE ID is the admin
    assert {o.name for o in result.get_response().outputs} == {"label", "probabilities"}
    with pytest.raises(InferenceServerException):
        _triton(strict).is_server_live()  # no client certificate: the handshake fails
    with pytest.raises(InferenceServerException) as err:
        _triton(strict, strict.pki.stranger).infer(ONNX, [_grpc_input(strict.rows)])
    assert "401" in str(err.value) or "UNAUTHENTICATED" in str(err.value)
    # The revoked certificate re-encoded by its holder: still its revoked public key.
    with pytest.raises(InferenceServerException) as err:
        _triton(strict, strict.pki.twin).infer(ONNX, [_grpc_input(strict.rows)])
    assert "401" in str(err.value) or "UNAUTHENTICATED" in str(err.value)


def _refused(call: Any) -> str:
    """The gRPC call's refusal, as tritonclient reports it."""
    with pytest.raises(InferenceServerException) as err:
        call()
    return str(err.value)


def test_an_open_connection_loses_a_certificate_that_expires(strict: TlsServer) -> None:
    """REST keep-alive and a gRPC channel, opened while the certificate was valid: the request after its
    expiry is refused on the same connection (a new handshake would fail; a 401 proves the old one)."""
    lifetime = 3.0
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
    short = strict.pki.ca.issue("short-lived", cn="ingest", valid_until=until)
    body = infer_request(strict.rows)
    with strict.client(short) as rest:
        channel = _triton(strict, short)
        assert rest.post(f"/v2/models/{ONNX}/infer", json=body).status_code == 200
        assert channel.infer(ONNX, [_grpc_input(strict.rows)]).as_numpy("label").shape == (2,)
        time.sleep(max(0.0, until.replace(microsecond=0).timestamp() - time.time()) + 0.3)
        answer = rest.post(f"/v2/models/{ONNX}/infer", json=body)
        assert answer.status_code == 401 and answer.json()["code"] == "unauthenticated"
        refused = _refused(lambda: channel.infer(ONNX, [_grpc_input(strict.rows)]))
        assert "UNAUTHENTICATED" in refused or "401" in refused, refused
        channel.close()
    reasons = {r.get("reason") for r in _audit(strict)}
    assert "client_certificate_expired" in reasons


def test_an_open_connection_loses_a_certificate_whose_ca_is_replaced(strict: TlsServer) -> None:
    """Placed last: the client CA file is replaced by another CA's (the answer to a compromised CA) and
    reloaded; connections opened under the old CA are refused on their next request, then it is put back."""
    pki, ca_file = strict.pki, strict.root / "tls" / "ca.pem"
    body = infer_request(strict.rows)
    original = ca_file.read_bytes()
    with strict.client(pki.ingest) as rest:
        channel = _triton(strict, pki.ingest)
        assert rest.post(f"/v2/models/{ONNX}/infer", json=body).status_code == 200
        assert channel.infer(ONNX, [_grpc_input(strict.rows)]).as_numpy("label").shape == (2,)
        try:
            ca_file.write_bytes((pki.foreign.cert.parent / "other-ca.pem").read_bytes())
            deadline = time.monotonic() + 10
            while (answer := rest.post(f"/v2/models/{ONNX}/infer", json=body)).status_code == 200:
                assert time.monotonic() < deadline, "the kept connection still answers after the CA left"
                time.sleep(0.1)
            assert answer.status_code == 401 and answer.json()["code"] == "unauthenticated"
            refused = _refused(lambda: channel.infer(ONNX, [_grpc_input(strict.rows)]))
            assert "UNAUTHENTICATED" in refused or "401" in refused, refused
            channel.close()
        finally:
            ca_file.write_bytes(original)
    deadline = time.monotonic() + 10
    while (status := _status_or_none(strict, pki.ingest)) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200  # the CA back: a new connection is served again
    reasons = {r.get("reason") for r in _audit(strict)}
    assert "client_certificate_untrusted" in reasons


def _status_or_none(t: TlsServer, cert: Issued) -> int | None:
    try:
        return t.infer(cert).status_code
    except httpx.TransportError:
        return None


def test_status_over_tls_and_the_secure_session_cookie_under_tossing(tls: TlsServer) -> None:
    """Operations over TLS (red team of issue 12, second pass): `bastion status` trusts a private CA
    named in SSL_CERT_FILE, as the README says; the dashboard's cookie is `__Host-bastion_session`, and a
    junk one of the same name sent first neither hides nor clears it (F5)."""
    import os

    admin = tls.keys["admin"]
    env = {**os.environ, "STATUS_KEY": admin, "SSL_CERT_FILE": str(tls.pki.ca.pem)}
    done = subprocess.run(
        [*BASTION, "status", "--url", tls.url, "--key", "env:STATUS_KEY", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["admin"] is True and admin not in done.stdout + done.stderr
    with httpx.Client(verify=tls.context(), timeout=10) as http:
        opened = http.post(f"{tls.url}/v2/admin/session", headers={"Authorization": f"Bearer {admin}"}, json={})
        assert opened.status_code == 200, opened.text
        set_cookie = opened.headers["set-cookie"]
        assert set_cookie.startswith("__Host-bastion_session=") and "; Secure" in set_cookie
        value = set_cookie.split(";")[0].split("=", 1)[1]
        tossed = {"Cookie": f"__Host-bastion_session=junk; __Host-bastion_session={value}"}
        summary = http.get(f"{tls.url}/v2/admin/summary", headers=tossed)
        assert summary.status_code == 200 and "set-cookie" not in summary.headers
        # The plain name is not read over TLS.
        plain = http.get(f"{tls.url}/v2/admin/summary", headers={"Cookie": f"bastion_session={value}"})
        assert plain.status_code == 401
