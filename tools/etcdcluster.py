"""A real etcd cluster on 127.0.0.1: Debian's `/usr/bin/etcd` (etcd-server 3.4), for the tests
(tests/etcdcluster.py adds their pytest fixtures) and the fleet benchmark (bench/fleet.py).

    with EtcdCluster(tmp_path, members=3) as cluster:
        cluster.endpoints            # ("http://127.0.0.1:<port>", ...) client URLs
        cluster.kill("m1")           # SIGKILL one member (its data dir stays)
        cluster.restart("m1")        # start it again from its data dir
        cluster.stop()               # SIGKILL every member; always done on exit

    EtcdCluster(tmp_path, members=1, tls=make_tls(tmp_path / "pki"))   # https clients,
        # client certificates required (--client-cert-auth), signed by a fresh test CA

Every member listens on free ports of 127.0.0.1 (client and peer), keeps its data and
its log in a temporary directory of its own, and is started with a parent-death signal:
a test run that is killed leaves no etcd behind. Every wait is bounded (`START_BOUND`,
`STOP_BOUND`); a member that does not come up is an `EtcdClusterError` naming it and the
tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD = "/usr/bin/etcd"
START_BOUND = 60.0  # seconds for a cluster to elect a leader and answer /health
STOP_BOUND = 20.0
# Large enough that a test can store a hostile value of several MiB in one key.
MAX_REQUEST_BYTES = 16 << 20
_PR_SET_PDEATHSIG = 1


class EtcdClusterError(RuntimeError):
    """etcd is not installed, or a member did not come up (one line: which, and why)."""


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies (a
    killed test run or benchmark leaves nothing behind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """A test PKI: one CA, a server certificate for 127.0.0.1, a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TLSFiles:
    """A fresh CA and two certificates it signed (EC P-256, valid one day) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("ab-updater test CA"))
        .issuer_name(name("ab-updater test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, usage: list[x509.ObjectIdentifier], stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        path = directory / f"{stem}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path, write_key(key, directory / f"{stem}-key.pem")

    # etcd's JSON gateway dials etcd's own gRPC server with the server certificate as
    # its client certificate: with --client-cert-auth it must allow client auth too
    # (else every gateway request is "503 connection closed").
    server_cert, server_key = issue(
        "127.0.0.1",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "server",
    )
    client_cert, client_key = issue("node-1", [ExtendedKeyUsageOID.CLIENT_AUTH], "client")
    return TLSFiles(directory / "ca.pem", server_cert, server_key, client_cert, client_key)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


class EtcdCluster:
    """`members` etcd processes forming one cluster; a context manager."""

    def __init__(
        self, root: Path | None = None, members: int = 3, tls: TLSFiles | None = None
    ) -> None:
        if not Path(ETCD).exists():
            raise EtcdClusterError(
                f"{ETCD} is not installed; run `make test`, which installs etcd-server"
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="etcd-", dir=root))
        self.members: dict[str, Member] = {}
        for i in range(members):
            name = f"m{i}"
            self.members[name] = Member(
                name=name,
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=self._tmp / name,
                log=self._tmp / f"{name}.log",
                scheme="https" if tls else "http",
            )
        self.tls = tls
        self.token = f"ab-updater-test-{os.getpid()}-{id(self)}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members.values())

    def endpoint(self, name: str) -> str:
        return self.members[name].client_url

    def _argv(self, member: Member) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members.values())
        return [
            ETCD,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.token}",
            # Fast elections: a killed member's loss is noticed within a second or two.
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            f"--max-request-bytes={MAX_REQUEST_BYTES}",
            "--logger=zap",
            "--log-outputs=stderr",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.server_cert}",
            f"--key-file={self.tls.server_key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        ]

    def _spawn(self, member: Member) -> None:
        with member.log.open("ab") as log:
            member.process = subprocess.Popen(
                self._argv(member),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,  # no threads start etcd
            )

    def start(self) -> EtcdCluster:
        """Start every member and wait (bounded) until each says it is healthy."""
        for member in self.members.values():
            self._spawn(member)
        self.wait_healthy(*self.members)
        return self

    def restart(self, name: str) -> None:
        """Start a killed or stopped member again from its data dir; wait until healthy."""
        member = self.members[name]
        assert not member.running(), f"etcd member {name} is still running"
        self._spawn(member)
        self.wait_healthy(name)

    def wait_healthy(self, *names: str) -> None:
        deadline = time.monotonic() + START_BOUND
        pending = list(names)
        while pending:
            member = self.members[pending[0]]
            if not member.running():
                raise EtcdClusterError(f"etcd member {member.name} exited: {member.log_tail()}")
            if health(member.client_url, self.tls):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise EtcdClusterError(
                    f"etcd member {member.name} not healthy after {START_BOUND:.0f} s: "
                    f"{member.log_tail()}"
                )
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL one member, as a crashed or powered-off node."""
        member = self.members[name]
        if member.process is not None and member.running():
            member.process.kill()
            member.process.wait(timeout=STOP_BOUND)

    def stop(self) -> None:
        """Stop every member. SIGKILL: the data is thrown away, and a SIGTERM'd member
        of a cluster going down waits seconds for a leader transfer nobody can take."""
        for member in self.members.values():
            if member.process is not None and member.running():
                member.process.kill()
        for member in self.members.values():
            if member.process is not None:
                member.process.wait(timeout=STOP_BOUND)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def health(url: str, tls: TLSFiles | None = None, timeout: float = 2.0) -> bool:
    """True when the member at client URL `url` answers `/health` with health true
    (it has a leader and a quorum read went through)."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=context) as resp:
            body = json.loads(resp.read(4096))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


@contextlib.contextmanager
def cluster(
    root: Path | None = None, members: int = 3, tls: TLSFiles | None = None
) -> Iterator[EtcdCluster]:
    with EtcdCluster(root, members, tls) as c:
        yield c
