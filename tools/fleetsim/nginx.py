"""One real nginx serving a signed repository on 127.0.0.1, with an access log that
says, per request, when it ended, its status, the bytes sent and which node asked.

    with Nginx(repo_dir, work_dir) as server:
        server.url                      # http://127.0.0.1:<port>
        ...
    requests = read_access_log(server.access_log)

The approach of tests/integration/test_mirror_agent.py (nginx in the foreground with a
prefix and temp paths of its own), made for a fleet: enough connections for every
node's keep-alive session, and a log format the benchmark parses. A node is named by
its User-Agent (the simulation gives each node a `requests.Session` whose User-Agent
holds ` node=<name> phase=<phase>`).

Invariants: nginx listens on 127.0.0.1 only; every wait is bounded; the access log is
complete once the context exits (nginx flushes it when it stops).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tools.etcdcluster import die_with_parent

START_BOUND = 30.0
STOP_BOUND = 30.0
LOG_FORMAT = (
    '$msec $status $bytes_sent $body_bytes_sent "$request_method" "$uri" "$http_user_agent"'
)
_LINE = re.compile(
    r"(?P<msec>[0-9.]+) (?P<status>[0-9]{3}) (?P<bytes>[0-9]+) (?P<body>[0-9]+) "
    r'"(?P<method>[^"]*)" "(?P<uri>[^"]*)" "(?P<agent>[^"]*)"'
)
_NODE = re.compile(r"node=([A-Za-z0-9_.-]+)")
_PHASE = re.compile(r"phase=([A-Za-z0-9_-]+)")


def find_nginx() -> str:
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if path is None:
        raise RuntimeError("nginx is not installed (tools/setup.sh test installs it)")
    return path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Request:
    """One line of the access log."""

    at: float  # when the response was sent (nginx's $msec, seconds since the epoch)
    status: int
    bytes_sent: int  # headers and body
    body_bytes: int
    method: str
    uri: str
    node: str | None  # the node= of the User-Agent, None for anyone else
    phase: str | None  # its phase=


def read_access_log(path: Path) -> list[Request]:
    """Every request of the log written with `LOG_FORMAT`; a line that does not parse
    is an error (the benchmark's figures would be wrong without it)."""
    found: list[Request] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _LINE.fullmatch(line)
        if m is None:
            raise ValueError(f"{path}:{n}: not a line of the fleet log format: {line[:120]!r}")
        node, phase = _NODE.search(m["agent"]), _PHASE.search(m["agent"])
        found.append(
            Request(
                float(m["msec"]),
                int(m["status"]),
                int(m["bytes"]),
                int(m["body"]),
                m["method"],
                m["uri"],
                node[1] if node else None,
                phase[1] if phase else None,
            )
        )
    return found


class Nginx:
    """nginx serving `root` (its metadata/ and targets/) on a free 127.0.0.1 port."""

    def __init__(self, root: Path, work: Path, *, connections: int = 4096) -> None:
        self.root = root.resolve()
        self.work = work.resolve()
        self.port = free_port()
        self.connections = connections
        self.access_log = self.work / "access.log"
        self.error_log = self.work / "error.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """nginx's pid (it must be running)."""
        assert self._proc is not None, "nginx is not running"
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _conf(self) -> str:
        temp = "\n".join(
            f"    {k}_temp_path {self.work}/{k};"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
user root;
# One process, no master: it dies with the process that started it (parent-death
# signal), so a killed benchmark leaves no nginx behind; one core serves a fleet here.
master_process off;
worker_rlimit_nofile {2 * self.connections + 64};
daemon off;
pid {self.work}/nginx.pid;
error_log {self.error_log};
events {{ worker_connections {self.connections}; }}
http {{
    log_format fleet '{LOG_FORMAT}';
    access_log {self.access_log} fleet;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location / {{ }}
    }}
}}
"""

    def start(self) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(self._conf())
        self._proc = subprocess.Popen(
            [find_nginx(), "-p", str(self.work), "-c", str(conf), "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,  # started before the benchmark starts threads
        )
        deadline = time.monotonic() + START_BOUND
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"nginx exited: {err.strip() or self._log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.1),
            ):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx not listening after {START_BOUND:.0f} s: {self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.error_log.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_BOUND)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Nginx:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
