"""TLS for REST and gRPC (`[server.tls]`): one certificate, one policy, reloaded without a restart.

- Versions: TLS 1.2 and 1.3 (`min_version = "1.3"` drops 1.2). TLS 1.2 is limited to ECDHE key
  exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305): forward secrecy, no CBC, no RSA key
  exchange. TLS 1.3's suites are all AEAD with ephemeral keys. No compression, no renegotiation.
- Client certificates (`client_auth`): "optional" asks for one and verifies it if sent; "require"
  refuses the handshake without a valid one. Either way a certificate that does not chain to
  `client_ca_file` (another CA, expired, not yet valid) fails the handshake. No session is resumed:
  tickets are off (OP_NO_TICKET, no TLS 1.3 tickets) and so is OpenSSL's server session cache (TLS 1.2
  session IDs), which Python does not expose (`_disable_session_cache`). Trust is not decided once per
  connection either: every request re-checks the certificate (`ServerTls.check_client`: its validity
  window against now, its issuer against the current client CA set), so a kept-alive connection loses
  its identity when the certificate expires or its CA leaves `client_ca_file`. Which principal a valid
  certificate is, and its revocation, is the policy's business (bastion.certs), not this module's.
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
import ctypes
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from bastion.certs import ClientCertificate
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
    expires, starts, now = leaf.not_valid_after_utc, leaf.not_valid_before_utc, datetime.now(UTC)
    if expires <= now:
        raise ConfigError(f"{field}.cert_file: {settings.cert_file} expired on {expires:%Y-%m-%d %H:%M} UTC")
    if starts > now:
        # Every client would refuse it until then: the set serving now is worth more than this one.
        raise ConfigError(
            f"{field}.cert_file: {settings.cert_file} is not valid before {starts:%Y-%m-%d %H:%M:%S} UTC"
        )
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
        # Tickets (TLS 1.2 and 1.3) are off here; TLS 1.2 session IDs need the cache off too.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        _disable_session_cache(ctx)
    return ctx


_SSL_CTRL_SET_SESS_CACHE_MODE = 44  # OpenSSL's SSL_CTX_set_session_cache_mode is a macro over SSL_CTX_ctrl
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0


def _disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """Switch off OpenSSL's server session cache on `ctx` (TLS 1.2 resumption by session ID), which
    CPython sets to "server" and does not let one change. Done through the `SSL_CTX *` the `_ssl`
    object holds, after checking that pointer is what it seems (its options read back as
    `ctx.options`); False (and the per-request checks alone stand) if anything does not match."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # its symbols and those of the libssl it was linked with
        ctrl = lib.SSL_CTX_ctrl
        ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        get_options = lib.SSL_CTX_get_options
        get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        # PySSLContext starts with PyObject_HEAD, then `SSL_CTX *ctx`.
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or get_options(pointer) != int(ctx.options):
            raise LookupError("the SSL_CTX pointer does not read back this context's options")
        ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        if ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_OFF:
            raise LookupError("the session cache mode did not change")
    except (OSError, AttributeError, LookupError) as e:
        log.warning("TLS 1.2 session-ID resumption could not be switched off (%s): every request "
                    "re-checks its client certificate all the same", e)
        return False
    return True


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


_VERDICTS_MAX = 4096


def _certificates(pem: bytes | None) -> tuple[x509.Certificate, ...]:
    return () if pem is None else tuple(x509.load_pem_x509_certificates(pem))


def _issued_by_one_of(der: bytes, cas: tuple[x509.Certificate, ...]) -> bool:
    """Whether one of `cas` issued the DER certificate (its name is the issuer and its key signed it)."""
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    for ca in cas:
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return True
    return False


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
        # The client CA set requests are re-checked against (`check_client`), and its own generation:
        # verdicts are cached per certificate until the set changes.
        self._client_cas = _certificates(self.material.client_ca)
        self.ca_generation = 0
        self._verdicts: dict[ClientCertificate, tuple[int, bool]] = {}
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
            if material.client_ca != self.material.client_ca:
                self._client_cas = _certificates(material.client_ca)
                self.ca_generation += 1
            self.material, self._current = material, context
            self.generation += 1
        log.info("TLS certificate reloaded: serial %x; new connections use it", material.serial)
        return True

    def check_client(self, cert: ClientCertificate, now: float) -> str | None:
        """Whether a connection's client certificate still holds, for a request at `now` (Unix seconds):
        None, or why not (an `AuthenticationFailed` reason): "client_certificate_expired",
        "client_certificate_not_yet_valid", or "client_certificate_untrusted" when no certificate of the
        current `client_ca_file` issued it (its CA was removed or replaced by a reload since the
        handshake). The issuer check is cached per certificate and client CA set: two comparisons and a
        dictionary look-up per request while nothing changes."""
        if now >= cert.not_after:
            return "client_certificate_expired"
        if now < cert.not_before:
            return "client_certificate_not_yet_valid"
        generation = self.ca_generation
        cached = self._verdicts.get(cert)
        if cached is not None and cached[0] == generation:
            trusted = cached[1]
        else:
            trusted = _issued_by_one_of(cert.der, self._client_cas)
            if len(self._verdicts) >= _VERDICTS_MAX:
                self._verdicts.clear()  # bounded: a certificate is only ever verified again
            self._verdicts[cert] = (generation, trusted)
        return None if trusted else "client_certificate_untrusted"

    def recheck(self, cert: ClientCertificate | None, now: float) -> ClientCertificate | None:
        """`cert` as a request at `now` sees it: itself while it holds, else a copy whose `refused`
        says why (the identity stage refuses the request, bastion.stages.identity). None stays None."""
        if cert is None:
            return None
        reason = self.check_client(cert, now)
        return cert if reason is None else replace(cert, refused=reason)

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
