"""Start Debian's redis-server on 127.0.0.1 for the queue tests and demos: an ACL file (no password on any
command line), append-only persistence (a restart keeps the queue), optionally TLS only.

Only the standard library; every wait is bounded.
"""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from zimage_dev.comfy_server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> str | None:
    """None when redis-server can run here, else why not (for a test's skip)."""
    if not Path(REDIS_SERVER).is_file():
        return "no redis-server: scripts/setup_runtime.sh installs Debian's (apt-get install redis-server)"
    return None


class RedisServer:
    """One redis-server in its own folder. acl: the text of its ACL file. tls: (cert, key, ca) files; then it
    listens with TLS only (port 0 for plain TCP)."""

    def __init__(self, base: Path, acl: str, tls: tuple[Path, Path, Path] | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.acl, self.tls = acl, tls
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        (self.base / "users.acl").write_text(self.acl, encoding="utf-8")
        (self.base / "users.acl").chmod(0o600)
        lines = ["bind 127.0.0.1", "protected-mode yes", f"dir {self.base}", "aclfile users.acl",
                 "appendonly yes", "appendfsync always", 'save ""', "daemonize no", "loglevel notice",
                 f"logfile {self.base / 'redis.log'}"]
        if self.tls:
            cert, key, ca = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        else:
            lines += [f"port {self.port}"]
        config = self.base / "redis.conf"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config

    def start(self, timeout: float = 30) -> "RedisServer":
        config = self.write_config()
        self.proc = subprocess.Popen([REDIS_SERVER, str(config)], cwd=self.base, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self.log_tail()}")
            if self.listening():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not listen within {timeout} s:\n{self.log_tail()}")

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return "Ready to accept connections" in self.log_text()
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        (self.base / "redis.log").unlink(missing_ok=True)
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        path = self.base / "redis.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl); (cert, key, ca)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=zimage test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
            "-extfile", ext)
    ssl.create_default_context(cafile=str(ca))        # a bad file fails here, not inside a test
    return cert, key, ca
