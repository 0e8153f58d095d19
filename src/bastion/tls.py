"""TLS for REST and gRPC (`[server.tls]`): one certificate, one policy, reloaded without a restart.

- Versions: TLS 1.2 and 1.3 (`min_version = "1.3"` drops 1.2). TLS 1.2 is limited to ECDHE key
  exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305): forward secrecy, no CBC, no RSA key
  exchange. TLS 1.3's suites are all AEAD with ephemeral keys. No compression, no renegotiation.
- Client certificates (`client_auth`): "optional" asks for one and verifies it if sent; "require"
  refuses the handshake without a valid one. Either way a certificate that does not chain to
  `client_ca_file` (another CA, expired, not yet valid) fails the handshake, and no session is
  resumed (every connection's certificate is verified anew). Which principal a valid certificate is,
  is the policy's business (bastion.certs), not this module's.
- Reload: the files' modification times are checked every `reload_interval_seconds`, and on SIGHUP.
  A new set that loads and validates replaces the old for new connections (open ones keep theirs);
  one that does not (half-written, key not matching) is logged and the old set keeps serving.
  REST swaps `ssl.SSLContext`s in the listening context's `sni_callback`, which OpenSSL calls on every
  ClientHello, with or without SNI; gRPC fetches the new set through `dynamic_ssl_server_credentials`.
- Handshake deadline: a client that connects and never completes its handshake is cut off after
  `[server] head_timeout_seconds` (`HandshakeBoundLoop`), as one that never sends its head would be.
  The front end's own limits start when the handshake ends (bastion.http.frontend); a handshake in
  progress is never counted as load.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bastion.config import TlsSettings
from bastion.errors import ConfigError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("bastion.tls")

# TLS 1.2: ephemeral ECDH with an AEAD cipher only (OpenSSL cipher-string syntax). TLS 1.3 suites are
# configured apart in OpenSSL and are all AEAD with ephemeral keys.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of one certificate set, read and checked together."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    serial: int  # of the server certificate (logged on reload; tests read it back)
    stamp: tuple[tuple[int, int, int], ...]  # (inode, size, mtime_ns) of each file when read


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _paths(settings: TlsSettings) -> list[tuple[str, Path]]:
    paths = [("cert_file", settings.cert_file), ("key_file", settings.key_file)]
    if settings.client_ca_file is not None:
        paths.append(("client_ca_file", settings.client_ca_file))
    return paths


def read_material(settings: TlsSettings, where: Path) -> TlsMaterial:
    """Read and check the files `settings` names.

    Raises ConfigError naming `[server.tls]`'s field: a file that cannot be read, is not PEM of its
    kind, a private key that does not match the certificate, or a server certificate already expired.
    """
    field = f"{where}: server.tls"
    data: dict[str, bytes] = {}
    stamps = []
    for name, path in _paths(settings):
        try:
            stamps.append(_stamp(path))
            data[name] = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{field}.{name}: cannot read {path}: {e.strerror or e}") from None
    try:
        chain = x509.load_pem_x509_certificates(data["cert_file"])
    except ValueError:
        raise ConfigError(f"{field}.cert_file: {settings.cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(data["key_file"], password=None)
    except (ValueError, TypeError) as e:
        # TypeError: the key is encrypted (a passphrase is not supported: the server starts unattended).
        raise ConfigError(
            f"{field}.key_file: {settings.key_file}: not an unencrypted PEM private key ({e})"
        ) from None
    leaf = chain[0]
    expires = leaf.not_valid_after_utc
    if expires <= datetime.now(UTC):
        raise ConfigError(f"{field}.cert_file: {settings.cert_file} expired on {expires:%Y-%m-%d %H:%M} UTC")
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, raw) != leaf.public_key().public_bytes(encoding, raw):
        raise ConfigError(f"{field}.key_file: {settings.key_file} is not the key of {settings.cert_file}")
    ca = data.get("client_ca_file")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ConfigError(
                f"{field}.client_ca_file: {settings.client_ca_file} holds no PEM certificate"
            ) from None
    return TlsMaterial(data["cert_file"], data["key_file"], ca, leaf.serial_number, tuple(stamps))


def build_context(settings: TlsSettings, material: TlsMaterial) -> ssl.SSLContext:
    """A server `ssl.SSLContext` for `settings`' files and policy (`material`: the client CAs, as read).
    OpenSSL reads the certificate and key from the files themselves: `load` checks that they are still
    what `material` holds. Raises ssl.SSLError if OpenSSL refuses them (a race with a writer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_auth != "none":
        assert material.client_ca is not None
        ctx.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.client_auth == "require" else ssl.CERT_OPTIONAL
        # No session resumption: a resumed session is not verified again, so a client certificate that
        # expired, or whose CA left client_ca_file, would go on being accepted for the session's life.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def load(settings: TlsSettings, where: Path) -> tuple[TlsMaterial, ssl.SSLContext]:
    """Read, check and load the files: what was checked and the context serving it.

    The files are read again after OpenSSL loaded them: a renewal landing in between (its certificate
    and key checked as a pair, but not what OpenSSL read) is caught and the load retried. Raises
    ConfigError naming the field (see `read_material`), or ssl.SSLError.
    """
    for _ in range(3):
        material = read_material(settings, where)
        context = build_context(settings, material)
        again = read_material(settings, where)
        if (again.cert_chain, again.key, again.client_ca) == (
            material.cert_chain,
            material.key,
            material.client_ca,
        ):
            return material, context
    raise ConfigError(f"{where}: server.tls: the certificate files kept changing while they were read")


class ServerTls:
    """The server's TLS: the listening `ssl.SSLContext` (REST), gRPC's credentials, and reloading.

    Raises ConfigError (naming the field) from the constructor when the files cannot serve.
    """

    def __init__(self, settings: TlsSettings, where: Path) -> None:
        self.settings = settings
        self._where = where
        self._lock = threading.Lock()  # reload runs on the event loop; gRPC's fetcher on its threads
        try:
            self.material, self._current = load(settings, where)
        except ssl.SSLError as e:
            raise ConfigError(f"{where}: server.tls: OpenSSL refused the certificate or key: {e}") from None
        self.generation = 0
        self._seen: tuple[tuple[int, int, int], ...] | None = self.material.stamp  # None: unreadable
        # The context every connection starts with: its sni_callback moves the handshake onto the
        # current context. It is the first current one, so until a reload the callback does nothing.
        self.listening = self._current
        self.listening.sni_callback = self._select

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self._current
        if current is not ctx:
            conn.context = current

    def reload(self) -> bool:
        """Re-read the files; on success new connections use them. True if the set changed.
        A set that does not load is logged (field and reason, no key material) and the old one kept."""
        try:
            stamp = self._stamps()
            material, context = load(self.settings, self._where)
        except (OSError, ConfigError, ssl.SSLError) as e:
            log.error("TLS reload refused, the previous certificate keeps serving: %s", e)
            self._seen = None if isinstance(e, OSError) else stamp  # tried: retried when the files move again
            return False
        with self._lock:
            changed = material.cert_chain != self.material.cert_chain or material.key != self.material.key
            changed = changed or material.client_ca != self.material.client_ca
            self._seen = material.stamp
            if not changed:
                return False
            self.material, self._current = material, context
            self.generation += 1
        log.info("TLS certificate reloaded: serial %x; new connections use it", material.serial)
        return True

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_stamp(path) for _, path in _paths(self.settings))

    def changed_on_disk(self) -> bool:
        """Whether any file's (inode, size, mtime) differs from when it was last read, successfully or
        not (a refused set is not re-read, and re-logged, until it changes again)."""
        try:
            return self._stamps() != self._seen
        except OSError:
            return self._seen is not None  # a file is missing: one attempt, one log line

    async def watch(self) -> None:
        """Reload when the files change, every `reload_interval_seconds` (0: never; SIGHUP still does)."""
        interval = self.settings.reload_interval_seconds
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.changed_on_disk():
                self.reload()

    # gRPC

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        import grpc

        m = self.material
        return grpc.ssl_server_certificate_configuration(
            [(m.key, m.cert_chain)], root_certificates=m.client_ca
        )

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `grpc.aio.Server.add_secure_port` that follow reloads. gRPC's Python API asks
        for a client certificate only when it requires one: with client_auth = "optional" gRPC asks for
        none (certificate identities then work over REST only); "require" requires it on gRPC too."""
        import grpc

        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before every new connection's handshake: cheap when nothing changed.
            with self._lock:
                if served[0] == self.generation:
                    return None
                served[0] = self.generation
                return self._grpc_config()

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(),
            fetch,  # type: ignore[arg-type]  # the stubs omit the documented None ("no change")
            require_client_authentication=self.settings.client_auth == "require",
        )


class HandshakeBoundLoop(uvloop.Loop):
    """uvloop's loop, with a TLS server's handshake bounded by `handshake_timeout` seconds (uvicorn
    does not pass `ssl_handshake_timeout`, and the default, 60 s, lets silent sockets pile up)."""

    handshake_timeout: float = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout)
        return await super().create_server(*args, **kwargs)


def handshake_bound_loop_factory(handshake_timeout: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop factory for `uvicorn.Config(loop=...)` whose TLS handshakes end within `handshake_timeout`."""

    def factory() -> asyncio.AbstractEventLoop:
        loop = HandshakeBoundLoop()
        loop.handshake_timeout = handshake_timeout
        return loop

    return factory
