"""TLS reload with broken files, then a flood of never-finishing handshakes on REST and gRPC:
is the old certificate kept, does the server survive, do health and a keyed request still answer?"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy

from bastion.demo import infer_request


def serial(d, port=None) -> str:
    ctx = ssl.create_default_context(cafile=d.ca.pem)
    ctx.load_cert_chain(d.certs["stranger"].cert, d.certs["stranger"].key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port or d.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            return hex(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number)[:10]
    except Exception as e:
        return f"FAILED {type(e).__name__} {e}"[:100]


def probe(d) -> str:
    ctx = ssl.create_default_context(cafile=d.ca.pem)
    t0 = time.monotonic()
    try:
        with httpx.Client(verify=ctx, timeout=15) as http:
            live = http.get(f"{d.url}/v2/health/live").status_code
            t1 = time.monotonic()
            inf = http.post(
                f"{d.url}/v2/models/breast-cancer/infer",
                json=infer_request(d.rows),
                headers={"Authorization": f"Bearer {d.keys['analyst']}"},
            ).status_code
        return f"live {live} in {t1 - t0:.2f}s, infer {inf} in {time.monotonic() - t1:.2f}s"
    except Exception as e:
        return f"FAILED after {time.monotonic() - t0:.2f}s: {type(e).__name__} {e}"[:120]


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="rt-reload-"))
    d = deploy(root, client_auth="optional", server_settings="head_timeout_seconds = 10\n")
    tls = d.config.parent / "tls"
    pid = d.server.process.pid
    try:
        print("serving serial", serial(d), "grpc", serial(d, d.grpc_port))
        # 1. half-written certificate
        (tls / "server.pem").write_bytes(d.certs["server"].cert.read_bytes()[:100])
        time.sleep(1.5)
        print(
            "half-written cert: alive",
            d.server.process.poll() is None,
            "serial",
            serial(d),
            "grpc",
            serial(d, d.grpc_port),
        )
        # 2. valid cert of another key (the key not yet renamed in)
        new = d.ca.issue("server-new", cn="127.0.0.1", server=True)
        shutil.copy(new.cert, tls / "server.pem")
        time.sleep(1.5)
        print("cert without its key: serial", serial(d))
        shutil.copy(new.key, tls / "server.key")
        time.sleep(1.5)
        print(
            "then its key: serial",
            serial(d),
            "(new is",
            hex(new.serial)[:10],
            ")",
            "grpc",
            serial(d, d.grpc_port),
        )
        # 3. key file removed, SIGHUP
        os.rename(tls / "server.key", tls / "server.key.gone")
        os.kill(pid, signal.SIGHUP)
        time.sleep(1.5)
        print("key removed + SIGHUP: alive", d.server.process.poll() is None, "serial", serial(d))
        os.rename(tls / "server.key.gone", tls / "server.key")
        # 4. CA file replaced by garbage
        (tls / "ca.pem").write_bytes(b"not a pem\n")
        time.sleep(1.5)
        print("garbage client CA: alive", d.server.process.poll() is None, probe(d))
        shutil.copy(d.ca.pem, tls / "ca.pem")
        # 5. a server certificate not yet valid (starts tomorrow)
        import datetime
        import ipaddress

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        k = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        c = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(d.ca.name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=5))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
            )
            .sign(d.ca.key, hashes.SHA256())
        )
        tmpc, tmpk = tls / ".c", tls / ".k"
        tmpk.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        tmpc.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        os.rename(tmpk, tls / "server.key")
        os.rename(tmpc, tls / "server.pem")
        time.sleep(1.5)
        print("not-yet-valid server cert loaded?:", serial(d), "(it is", hex(c.serial_number)[:10], ")")
        shutil.copy(new.cert, tls / ".c")
        shutil.copy(new.key, tls / ".k")
        os.rename(tls / ".k", tls / "server.key")
        os.rename(tls / ".c", tls / "server.pem")
        time.sleep(1.5)
        print("restored:", serial(d))
        # 6. flood of never-finishing handshakes
        print("before flood:", probe(d))
        hello = None
        socks = []
        for port, n, half in ((d.port, 3000, False), (d.port, 1000, True), (d.grpc_port, 1000, False)):
            for _ in range(n):
                s = socket.socket()
                s.setblocking(True)
                try:
                    s.connect(("127.0.0.1", port))
                    if half:
                        s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
                except OSError as e:
                    print("connect failed", e)
                    break
                socks.append(s)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = int([ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")][0].split()[1]) // 1024
        print(f"flood of {len(socks)} silent/half handshakes open: server fds {fds}, RSS {rss} MiB")
        print("during flood:", probe(d), "| grpc serial", serial(d, d.grpc_port))
        time.sleep(11)
        still = 0
        for s in socks:
            s.settimeout(0.001)
            try:
                still += (s.recv(1) == b"" and 0) or 1
            except (TimeoutError, BlockingIOError):
                still += 1
            except OSError:
                pass
        print(
            f"after head_timeout (10 s): {still} of {len(socks)} still open by the server; fds {len(os.listdir(f'/proc/{pid}/fd'))}"
        )
        print("after:", probe(d))
        for s in socks:
            s.close()
    finally:
        d.server.stop()
        log = d.log()
        print("--- log lines about TLS:")
        for ln in log.splitlines():
            if "tls" in ln.lower() or "Traceback" in ln or "certificate" in ln.lower():
                print("  ", ln[:220])


if __name__ == "__main__":
    main()
