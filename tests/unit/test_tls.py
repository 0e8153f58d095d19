"""TLS settings, certificate identities and certificate reload, in process (bastion.tls, bastion.certs).
The real server over TLS is attacked in tests/e2e/test_tls.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from bastion.certs import CertificateIdentities, ClientCertificate, read_certificate
from bastion.config import CertificateIdentity, TlsSettings, load_config
from bastion.errors import AuthenticationFailed, ConfigError
from bastion.keys import KeyStore
from bastion.routes import Route
from bastion.stages.identity import Authenticate
from bastion.tls import ServerTls
from bastion.tokens import TokenAuthority, load_or_create_signing_key
from tests.helpers import core_context
from tests.pki import SPIFFE_SCORER, Authority, malleate

SUBJECT = "CN=ingest,O=Bastion Tests"  # as cryptography writes the subject the PKI makes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = Authority(root, "test"), Authority(root, "other")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server", cn="127.0.0.1", server=True),
        "server2": ca.issue("server2", cn="127.0.0.1", server=True),
        "ingest": ca.issue("ingest", cn="ingest"),
        "scorer": ca.issue("scorer", cn="scorer-workload", spiffe_id=SPIFFE_SCORER),
    }


def _der(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


# -- Settings: every file and mapping checked at start-up, naming the field ---------------------------


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bastion.toml"
    path.write_text('[roles.analyst]\ngrants = [{ models = ["m"], actions = ["infer"] }]\n' + text)
    return path


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('[server.tls]\ncert_file = "c.pem"\n', "server.tls.key_file", "Field required"),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_auth = "require"\n',
            "server.tls",
            "needs client_ca_file",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\n',
            "server.tls",
            "client_ca_file is used only when client_auth",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nmin_version = "1.1"\n',
            "server.tls.min_version",
            "",
        ),
        (
            '[[client_certificates.identities]]\nname = "a"\nsubject = "CN=a"\nroles = ["analyst"]\n',
            "client_certificates",
            "would be ignored",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            '[[client_certificates.identities]]\nname = "a"\nsubject = "CN=a"\nroles = ["root"]\n',
            "client_certificates.identities.0.roles",
            "no role 'root'",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            '[[client_certificates.identities]]\nname = "a"\nsubject = "CN=a"\nspiffe_id = "spiffe://t/a"\n'
            'roles = ["analyst"]\n',
            "client_certificates.identities.0",
            "exactly one of subject and spiffe_id",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            '[[client_certificates.identities]]\nname = "a"\nsubject = "not a name"\nroles = ["analyst"]\n',
            "client_certificates.identities.0",
            "RFC 4514",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            '[[client_certificates.identities]]\nname = "a"\nsubject = "CN=a,O=x"\nroles = ["analyst"]\n'
            '[[client_certificates.identities]]\nname = "b"\nsubject = "CN=a,O=x"\nroles = ["analyst"]\n',
            "client_certificates.identities.1",
            "subject 'CN=a,O=x' is also identities.0's",
        ),
        (
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            '[client_certificates]\nrevoked_public_keys = ["AB"]\n',
            "client_certificates.revoked_public_keys.0",
            "should match pattern",
        ),
        (
            f'[client_certificates]\nrevoked_public_keys = ["{"a" * 64}"]\n',
            "client_certificates",
            "would be ignored",
        ),
        (  # the DER hash its holder can change: refused, naming what replaced it
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\nclient_auth = "optional"\n'
            f'[client_certificates]\nrevoked_fingerprints = ["{"a" * 64}"]\n',
            "client_certificates",
            "revoked_public_keys instead",
        ),
        (  # gRPC cannot be held to TLS 1.3 (grpcio has no version setting): refused, not ignored
            '[server.tls]\ncert_file = "c"\nkey_file = "k"\nmin_version = "1.3"\n[grpc]\nenabled = true\n',
            "server.tls.min_version",
            "cannot be enforced on gRPC",
        ),
    ],
)
def test_tls_settings_that_could_not_work_are_refused_naming_the_field(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = _policy(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {field}:"), str(err.value)
    assert reason in str(err.value)


def test_certificate_files_that_cannot_serve_are_refused_naming_the_field(
    tmp_path: Path, pki: dict[str, object]
) -> None:
    ca, server, other = pki["ca"], pki["server"], pki["server2"]
    where = tmp_path / "bastion.toml"

    def refused(field: str, **settings: object) -> str:
        with pytest.raises(ConfigError) as err:
            ServerTls(TlsSettings.model_validate(settings), where)
        assert str(err.value).startswith(f"{where}: server.tls.{field}:"), str(err.value)
        return str(err.value)

    assert "cannot read" in refused("cert_file", cert_file=tmp_path / "absent.pem", key_file=server.key)  # type: ignore[attr-defined]
    assert "not the key of" in refused("key_file", cert_file=server.cert, key_file=other.key)  # type: ignore[attr-defined]
    assert "no PEM certificate" in refused("cert_file", cert_file=server.key, key_file=server.key)  # type: ignore[attr-defined]
    expired = ca.issue("expired-server", cn="127.0.0.1", server=True, expired=True)  # type: ignore[attr-defined]
    assert "expired on" in refused("cert_file", cert_file=expired.cert, key_file=expired.key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    assert "no PEM certificate" in refused(
        "client_ca_file",
        cert_file=server.cert,  # type: ignore[attr-defined]
        key_file=server.key,  # type: ignore[attr-defined]
        client_ca_file=garbage,
        client_auth="optional",
    )
    # And one that works, for contrast.
    ServerTls(
        TlsSettings(cert_file=server.cert, key_file=server.key, client_ca_file=ca.pem, client_auth="require"),  # type: ignore[attr-defined]
        where,
    )


# -- Identities: exact subject or SPIFFE ID, deny by default -----------------------------------------


def test_a_certificate_reads_its_subject_spiffe_id_public_key_and_validity(pki: dict[str, object]) -> None:
    ingest, scorer = pki["ingest"], pki["scorer"]
    read = read_certificate(_der(ingest.cert))  # type: ignore[attr-defined]
    assert read is not None and (read.subject, read.spiffe_id) == (SUBJECT, None)
    assert read.public_key_sha256 == ingest.public_key_sha256  # type: ignore[attr-defined]
    assert read.not_before < time.time() < read.not_after and read.refused is None
    read = read_certificate(_der(scorer.cert))  # type: ignore[attr-defined]
    assert read is not None and read.spiffe_id == SPIFFE_SCORER
    assert read_certificate(b"\x30\x03garbage") is None


def _identities(revoked: list[str] | None = None) -> CertificateIdentities:
    return CertificateIdentities(
        [
            CertificateIdentity(name="ingest", subject="CN=ingest,O=Bastion Tests", roles=["analyst"]),
            CertificateIdentity(name="scorer", spiffe_id=SPIFFE_SCORER, roles=["admin"]),
        ],
        revoked or [],
    )


def test_identities_match_exactly_and_deny_by_default() -> None:
    ids = _identities(revoked=["f" * 64])
    found = ids.match(ClientCertificate(SUBJECT, None, "a" * 64))
    assert found is not None and found.principal_id == "cert:ingest" and found.roles == ("analyst",)
    found = ids.match(ClientCertificate("CN=anything", SPIFFE_SCORER, "b" * 64))
    assert found is not None and found.principal_id == "cert:scorer"
    # Near misses name no one: another attribute order, a prefix, a longer SPIFFE path, case.
    for subject, spiffe in [
        ("O=Bastion Tests,CN=ingest", None),
        ("CN=ingest", None),
        ("CN=ingest,O=Bastion Tests,OU=x", None),
        ("CN=Ingest,O=Bastion Tests", None),
        ("CN=x", SPIFFE_SCORER + "/more"),
        ("CN=x", SPIFFE_SCORER.upper()),
    ]:
        assert ids.match(ClientCertificate(subject, spiffe, "c" * 64)) is None, subject
    with pytest.raises(AuthenticationFailed) as err:
        ids.match(ClientCertificate(SUBJECT, None, "f" * 64))
    assert err.value.reason == "certificate_revoked"
    with pytest.raises(AuthenticationFailed) as err:  # subject says ingest, SPIFFE ID says scorer
        ids.match(ClientCertificate(SUBJECT, SPIFFE_SCORER, "d" * 64))
    assert err.value.reason == "certificate_ambiguous"


def test_identity_stage_maps_a_certificate_refuses_two_credentials_and_keeps_quarantine(
    tmp_path: Path,
) -> None:
    asyncio.run(_identity_stage(tmp_path))


async def _identity_stage(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    tokens = TokenAuthority(
        load_or_create_signing_key(tmp_path / "t.jwk"), issuer="b", audience="b", default_ttl=60
    )
    stage = Authenticate(keys, tokens, certificates=_identities())
    key = keys.create(name="k", roles=["analyst"], now=time.time()).secret
    cert = ClientCertificate(SUBJECT, None, "e" * 64)

    ctx = core_context(Route.INFER, None, client_certificate=cert)
    await stage(ctx)
    assert ctx.principal is not None and ctx.principal.id == "cert:ingest"
    assert ctx.principal.via == "certificate" and ctx.principal.certificate == "e" * 64
    assert ctx.principal.roles == ("analyst",) and not ctx.principal.quarantined

    # A bearer credential on a connection whose certificate names a principal: refused, not chosen.
    with pytest.raises(AuthenticationFailed) as err:
        await stage(core_context(Route.INFER, f"Bearer {key}", client_certificate=cert))
    assert err.value.reason == "ambiguous_credentials"
    # A certificate no identity names is no credential: a bearer key decides, or nothing does.
    stranger = ClientCertificate("CN=stranger,O=Bastion Tests", None, "1" * 64)
    ctx = core_context(Route.INFER, f"Bearer {key}", client_certificate=stranger)
    await stage(ctx)
    assert ctx.principal is not None and ctx.principal.id.startswith("key:")
    with pytest.raises(AuthenticationFailed) as err:
        await stage(core_context(Route.INFER, None, client_certificate=stranger))
    assert err.value.reason == "missing_credentials"
    # Routes built without certificates (token, session) do not take one.
    with pytest.raises(AuthenticationFailed):
        await Authenticate(keys, tokens, allow_tokens=False)(
            core_context(Route.TOKEN, None, client_certificate=cert)
        )

    # Query auditing's quarantine is kept under the principal id and read on the next request.
    assert keys.quarantine("cert:ingest", now=time.time())
    ctx = core_context(Route.INFER, None, client_certificate=cert)
    await stage(ctx)
    assert ctx.principal is not None and ctx.principal.quarantined
    assert keys.release("cert:ingest")
    # `bastion keys revoke cert:ingest`: refused on every server sharing the key store.
    assert keys.revoke("cert:ingest", now=time.time())
    with pytest.raises(AuthenticationFailed) as err:
        await stage(core_context(Route.INFER, None, client_certificate=cert))
    assert err.value.reason == "certificate_identity_revoked"
    # The service identity's row holds no secret any key could match.
    assert keys.get("cert:ingest") is not None
    keys.close()


# -- Reload: new connections get the new certificate ---------------------------------------------------


def _served_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_reload_serves_new_files_to_new_connections_and_keeps_the_old_on_a_bad_set(
    tmp_path: Path, pki: dict[str, object]
) -> None:
    asyncio.run(_reload(tmp_path, pki))


async def _reload(tmp_path: Path, pki: dict[str, object]) -> None:
    ca, first, second = pki["ca"], pki["server"], pki["server2"]
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(first.cert.read_bytes())  # type: ignore[attr-defined]
    key.write_bytes(first.key.read_bytes())  # type: ignore[attr-defined]
    tls = ServerTls(TlsSettings(cert_file=cert, key_file=key), tmp_path / "bastion.toml")
    server = await asyncio.get_running_loop().create_server(
        asyncio.Protocol, "127.0.0.1", 0, ssl=tls.listening
    )
    port = server.sockets[0].getsockname()[1]
    try:
        assert await asyncio.to_thread(_served_serial, port, ca.pem) == first.serial  # type: ignore[attr-defined]
        assert not tls.changed_on_disk()
        # Half a renewal (the new certificate, the old key): refused, the old pair keeps serving.
        cert.write_bytes(second.cert.read_bytes())  # type: ignore[attr-defined]
        assert tls.changed_on_disk() and not tls.reload()
        assert await asyncio.to_thread(_served_serial, port, ca.pem) == first.serial  # type: ignore[attr-defined]
        key.write_bytes(second.key.read_bytes())  # type: ignore[attr-defined]
        assert tls.reload()
        assert await asyncio.to_thread(_served_serial, port, ca.pem) == second.serial  # type: ignore[attr-defined]
    finally:
        server.close()


@pytest.mark.services
def test_a_service_identity_is_quarantined_and_revoked_in_the_shared_key_store_too() -> None:
    """With state.backend = "redis" the keys live in Redis (bastion.records): a service identity's
    quarantine and revocation are kept there as well, so every replica refuses it."""
    from bastion.keys import SharedKeyStore
    from bastion.records.redis import RedisRecords
    from tests.helpers import REDIS_URL, drop_redis_keys, redis_prefix

    prefix = redis_prefix()
    a, b = (
        SharedKeyStore(RedisRecords(REDIS_URL, prefix=prefix)),
        SharedKeyStore(RedisRecords(REDIS_URL, prefix=prefix)),
    )
    try:
        assert a.get("cert:ingest") is None
        assert a.quarantine("cert:ingest", now=time.time()) and not a.quarantine(
            "cert:ingest", now=time.time()
        )
        deadline = time.monotonic() + 2
        while (
            b.get("cert:ingest") is None or b.get("cert:ingest").quarantined_at is None
        ) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        record = b.get("cert:ingest")
        assert record is not None and record.quarantined_at is not None and record.roles == ()
        assert b.release("cert:ingest") and b.revoke("cert:ingest", now=time.time())
        # The row holds no secret: no presented key can authenticate as it.
        with pytest.raises(AuthenticationFailed):
            a.authenticate("bst_" + "0" * 16 + "_" + "A" * 43, now=time.time())
    finally:
        a.close()
        b.close()
        drop_redis_keys(prefix)


def _reused(port: int, ca: Path, client: object, version: ssl.TLSVersion) -> list[bool]:
    """Three connections, each offering the previous one's session: which were resumed."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(client.cert, client.key)  # type: ignore[attr-defined]
    context.maximum_version = version
    session, reused = None, []
    for _ in range(3):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"x")  # TLS 1.3 tickets come after the handshake: give them a read
            tls.settimeout(0.2)
            with contextlib.suppress(OSError):
                tls.recv(1)
            reused.append(tls.session_reused)
            session = tls.session
    return reused


@pytest.mark.slow
def test_no_session_is_resumed_when_client_certificates_are_asked_for(pki: dict[str, object]) -> None:
    """A resumed session skips verification: with client certificates every connection is verified anew
    (a certificate that expired, or whose CA was dropped by a reload, is refused on the next one)."""
    ca, server, ingest = pki["ca"], pki["server"], pki["ingest"]

    async def go(client_auth: str) -> list[bool]:
        settings = TlsSettings(
            cert_file=server.cert,  # type: ignore[attr-defined]
            key_file=server.key,  # type: ignore[attr-defined]
            client_ca_file=None if client_auth == "none" else ca.pem,  # type: ignore[attr-defined]
            client_auth=client_auth,  # type: ignore[arg-type]
        )
        tls = ServerTls(settings, Path("bastion.toml"))
        listening = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=tls.listening
        )
        port = listening.sockets[0].getsockname()[1]
        try:
            out = []
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                out += await asyncio.to_thread(_reused, port, ca.pem, ingest, version)  # type: ignore[attr-defined]
            return out
        finally:
            listening.close()

    assert asyncio.run(go("none")) == [False, True, True] * 2  # the check can see a resumption
    assert asyncio.run(go("optional")) == [False] * 6
    assert asyncio.run(go("require")) == [False] * 6


def _s_client_resumes(port: int, ca: Path, client: object, tmp_path: Path) -> list[str]:
    """OpenSSL's own client, TLS 1.2, offering the first connection's session on a second one (what
    OP_NO_TICKET alone does not stop): "New" or "Reused" for each, or "no session" when the server gave
    the first none to resume (no session ID, no ticket: s_client has nothing to save)."""
    session = tmp_path / "session.pem"
    session.unlink(missing_ok=True)
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-CAfile", str(ca)]
    cert = ["-cert", str(client.cert), "-key", str(client.key)]  # type: ignore[attr-defined]
    seen = []
    for extra in ([*cert, "-sess_out", str(session)], ["-sess_in", str(session)]):
        if "-sess_in" in extra and not session.exists():
            return [*seen, "no session"]
        out = subprocess.run([*base, *extra], input=b"", capture_output=True, timeout=20).stdout.decode()
        seen += [line.split(",")[0] for line in out.splitlines() if line.startswith(("New,", "Reused,"))]
    return seen


def test_openssl_cannot_resume_a_tls12_session_by_id_when_client_certificates_are_asked_for(
    tmp_path: Path, pki: dict[str, object]
) -> None:
    """The red team's resumption: a session resumed by ID carried the certificate without verifying it
    again (and without the client sending it). The server's session cache is off: a full handshake."""
    ca, server, ingest = pki["ca"], pki["server"], pki["ingest"]

    async def go(client_auth: str) -> list[str]:
        settings = TlsSettings(
            cert_file=server.cert,  # type: ignore[attr-defined]
            key_file=server.key,  # type: ignore[attr-defined]
            client_ca_file=None if client_auth == "none" else ca.pem,  # type: ignore[attr-defined]
            client_auth=client_auth,  # type: ignore[arg-type]
        )
        tls = ServerTls(settings, Path("bastion.toml"))
        listening = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=tls.listening
        )
        port = listening.sockets[0].getsockname()[1]
        try:
            return await asyncio.to_thread(_s_client_resumes, port, ca.pem, ingest, tmp_path)  # type: ignore[attr-defined]
        finally:
            listening.close()

    assert asyncio.run(go("none")) == ["New", "Reused"]  # without client certificates: the probe sees it
    assert asyncio.run(go("optional")) == ["New", "no session"]
    assert asyncio.run(go("require")) == ["New", "no session"]


def test_a_revoked_certificate_re_encoded_by_its_holder_is_still_revoked(pki: dict[str, object]) -> None:
    """ECDSA malleability: (r, n - s) is another DER that still verifies. Revocation matches the public
    key, which the CA signed, so the twin is the same revoked certificate; the audit's id is the same."""
    ca, ingest = pki["ca"], pki["ingest"]
    twin_pem = malleate(ingest.cert.read_bytes())  # type: ignore[attr-defined]
    twin = x509.load_pem_x509_certificate(twin_pem)
    twin.verify_directly_issued_by(ca.cert)  # type: ignore[attr-defined]  # the CA's signature still holds
    original, copy = read_certificate(_der(ingest.cert)), read_certificate(_der_of(twin))  # type: ignore[attr-defined]
    assert original is not None and copy is not None and original.der != copy.der
    assert copy.public_key_sha256 == original.public_key_sha256 == ingest.public_key_sha256  # type: ignore[attr-defined]
    ids = _identities(revoked=[ingest.public_key_sha256])  # type: ignore[attr-defined]
    for cert in (original, copy):
        with pytest.raises(AuthenticationFailed) as err:
            ids.match(cert)
        assert err.value.reason == "certificate_revoked"


def _der_of(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def test_min_version_1_3_refuses_a_tls12_client(pki: dict[str, object]) -> None:
    ca, server = pki["ca"], pki["server"]

    async def go() -> None:
        settings = TlsSettings(cert_file=server.cert, key_file=server.key, min_version="1.3")  # type: ignore[attr-defined]
        tls = ServerTls(settings, Path("bastion.toml"))
        listening = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=tls.listening
        )
        port = listening.sockets[0].getsockname()[1]

        def handshake(version: ssl.TLSVersion) -> str:
            context = ssl.create_default_context(cafile=ca.pem)  # type: ignore[attr-defined]
            context.maximum_version = version
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
            ):
                return str(conn.version())

        try:
            assert await asyncio.to_thread(handshake, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(handshake, ssl.TLSVersion.TLSv1_2)
        finally:
            listening.close()

    asyncio.run(go())


def test_a_server_certificate_not_yet_valid_is_refused_at_start_up_and_on_reload(
    tmp_path: Path, pki: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """Every client would refuse it until its start: the set serving now keeps serving (one log line)."""
    ca, first = pki["ca"], pki["server"]
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    early = ca.issue("early-server", cn="127.0.0.1", server=True, valid_from=soon)  # type: ignore[attr-defined]
    where = tmp_path / "bastion.toml"
    with pytest.raises(ConfigError) as err:
        ServerTls(TlsSettings(cert_file=early.cert, key_file=early.key), where)
    assert str(err.value).startswith(f"{where}: server.tls.cert_file:") and "not valid before" in str(err.value)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(first.cert.read_bytes())  # type: ignore[attr-defined]
    key.write_bytes(first.key.read_bytes())  # type: ignore[attr-defined]
    tls = ServerTls(TlsSettings(cert_file=cert, key_file=key), where)
    cert.write_bytes(early.cert.read_bytes())
    key.write_bytes(early.key.read_bytes())
    with caplog.at_level("ERROR", logger="bastion.tls"):
        assert not tls.reload()
        assert not tls.changed_on_disk()  # tried: not re-read (nor re-logged) until the files move again
    assert tls.material.serial == first.serial  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if "not valid before" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_a_client_certificate_is_rechecked_on_every_request(tmp_path: Path, pki: dict[str, object]) -> None:
    """Trust is not decided once per connection: the certificate's window against the request's time,
    and its issuer against the client CA set serving now (a reload that removes its CA ends it)."""
    ca, other, server = pki["ca"], pki["other"], pki["server"]
    now = datetime.datetime.now(datetime.UTC)
    short = ca.issue("short", cn="ingest", valid_until=now + datetime.timedelta(seconds=30))  # type: ignore[attr-defined]
    later = ca.issue("later", cn="ingest", valid_from=now + datetime.timedelta(seconds=30))  # type: ignore[attr-defined]
    cas = tmp_path / "ca.pem"
    cas.write_bytes(ca.pem.read_bytes())  # type: ignore[attr-defined]
    settings = TlsSettings(
        cert_file=server.cert,  # type: ignore[attr-defined]
        key_file=server.key,  # type: ignore[attr-defined]
        client_ca_file=cas,
        client_auth="require",
    )
    tls = ServerTls(settings, tmp_path / "bastion.toml")
    cert = read_certificate(_der(short.cert))
    assert cert is not None
    t = now.timestamp()
    assert tls.check_client(cert, t) is None and tls.recheck(cert, t) is cert
    assert tls.check_client(cert, t + 31) == "client_certificate_expired"
    refused = tls.recheck(cert, t + 31)
    assert refused is not None and refused.refused == "client_certificate_expired"
    early = read_certificate(_der(later.cert))
    assert early is not None and tls.check_client(early, t) == "client_certificate_not_yet_valid"
    # Its CA replaced by another: refused on the next request; back, accepted again.
    cas.write_bytes(other.pem.read_bytes())  # type: ignore[attr-defined]
    assert tls.reload()
    assert tls.check_client(cert, t) == "client_certificate_untrusted"
    cas.write_bytes(other.pem.read_bytes() + ca.pem.read_bytes())  # type: ignore[attr-defined]
    assert tls.reload()
    assert tls.check_client(cert, t) is None
    # A certificate whose issuer's name matches but whose signature is another key's: untrusted.
    impostor = Authority(tmp_path / "impostor", "test")  # the same CA name, another key
    forged = read_certificate(_der(impostor.issue("forged", cn="ingest").cert))
    assert forged is not None and tls.check_client(forged, t) == "client_certificate_untrusted"


def test_a_certificate_refused_by_the_transport_gets_no_principal_even_with_a_key(tmp_path: Path) -> None:
    asyncio.run(_refused_by_transport(tmp_path))


async def _refused_by_transport(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    tokens = TokenAuthority(
        load_or_create_signing_key(tmp_path / "t.jwk"), issuer="b", audience="b", default_ttl=60
    )
    key = keys.create(name="k", roles=["analyst"], now=time.time()).secret
    stale = ClientCertificate(SUBJECT, None, "e" * 64, refused="client_certificate_expired")
    for stage in (Authenticate(keys, tokens, certificates=_identities()), Authenticate(keys, tokens)):
        for credentials in (None, f"Bearer {key}"):
            with pytest.raises(AuthenticationFailed) as err:
                await stage(core_context(Route.INFER, credentials, client_certificate=stale))
            assert err.value.reason == "client_certificate_expired"
    keys.close()


class _CountingRecords:
    """A Records wrapper counting `get` round trips (what a certificate request costs)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.gets = inner, 0

    def get(self, collection: str, key: str) -> str | None:
        self.gets += 1
        return self.inner.get(collection, key)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.services
def test_an_absent_service_identity_record_is_cached_and_its_quarantine_still_arrives_within_a_second() -> None:
    from bastion.keys import SharedKeyStore
    from bastion.records.redis import RedisRecords
    from tests.helpers import REDIS_URL, drop_redis_keys, redis_prefix

    prefix = redis_prefix()
    counted = _CountingRecords(RedisRecords(REDIS_URL, prefix=prefix))
    a = SharedKeyStore(counted)  # type: ignore[arg-type]
    b = SharedKeyStore(RedisRecords(REDIS_URL, prefix=prefix))
    try:
        for _ in range(50):  # 50 certificate requests: one read of the absent record, not 50
            assert a.get("cert:ingest") is None
        assert counted.gets == 1
        for _ in range(3):  # unknown key ids are still never cached (an attacker could fill the cache)
            assert a.get("0" * 16) is None
        assert counted.gets == 4
        # Another replica quarantines the identity: this one sees it within a second.
        assert b.quarantine("cert:ingest", now=time.time())
        start = time.monotonic()
        while (record := a.get("cert:ingest")) is None or record.quarantined_at is None:
            assert time.monotonic() - start < 1.0, "the quarantine did not arrive within 1 s"
            time.sleep(0.01)
        assert b.revoke("cert:ingest", now=time.time())
        start = time.monotonic()
        while (record := a.get("cert:ingest")) is not None and record.revoked_at is None:
            assert time.monotonic() - start < 1.0, "the revocation did not arrive within 1 s"
            time.sleep(0.01)
        assert record is not None and record.revoked_at is not None
    finally:
        a.close()
        b.close()
        drop_redis_keys(prefix)


def test_an_absent_service_identity_row_is_cached_in_sqlite_too(tmp_path: Path) -> None:
    a, b = KeyStore(tmp_path / "keys.db"), KeyStore(tmp_path / "keys.db")  # two processes' stores
    try:
        assert a.get("cert:ingest") is None and "cert:ingest" in a._cache
        assert b.quarantine("cert:ingest", now=time.time())
        record = a.get("cert:ingest")  # SQLite's data_version moved: read again at once
        assert record is not None and record.quarantined_at is not None
    finally:
        a.close()
        b.close()
