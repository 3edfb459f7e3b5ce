"""docs/scale_out.md's Redis steps run exactly as written: the password and ACL commands of step 2 and its
redis.conf block, taken from the Markdown, with only host, port and paths substituted, start a real
redis-server (Debian's) that takes TLS connections for the ACL users and refuses the rest."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from zimage_dev import REPO
from zimage_dev.comfy_server import free_port
from zimage_dev.redis_server import REDIS_SERVER, make_certificates, redis_available

DOC = (REPO / "docs" / "scale_out.md").read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    """The first fenced block after the line holding `marker`."""
    start = DOC.index(marker)
    match = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(DOC, start)
    return match.group(1)


def test_the_redelivery_bound_gives_the_sweep_locks_expiry():
    from zimage_queue.app import SWEEP_LOCK_EXPIRE
    assert f"until it expires, after {SWEEP_LOCK_EXPIRE} s" in " ".join(DOC.split())


def test_the_redis_conf_block_has_no_comment_after_a_value():
    """Redis takes `#` only at a line's start: `bind 10.0.0.2 # ...` would try to bind '#'."""
    for line in block_after("/etc/redis/redis.conf").splitlines():
        assert line.startswith("#") or "#" not in line, line


def test_the_documented_redis_setup_starts_and_enforces_the_acl(tmp_path):
    reason = redis_available()
    if reason:
        pytest.skip(reason)
    import redis
    etc = tmp_path / "etc"
    paths = {"/etc/zimage": str(etc / "zimage"), "/etc/redis/users.acl": str(etc / "users.acl"),
             "/etc/redis/tls": str(etc / "tls")}

    def substituted(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    # step 2's commands, as written (the redis user's chown is for a system install: skipped here)
    commands = [c for c in block_after("Make one password per role").splitlines() if not c.startswith("chown ")]
    script = substituted("\n".join(commands))
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=True, cwd=REPO, timeout=120,
                   env={"PATH": f"{REPO / '.runtime' / 'venv' / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert "zimage-worker" in (etc / "users.acl").read_text()

    cert, key, ca = make_certificates(etc / "tls")
    for src, name in ((cert, "redis.crt"), (key, "redis.key"), (ca, "ca.crt")):
        (etc / "tls" / name).write_bytes(src.read_bytes())
    port = free_port()
    conf = substituted(block_after("/etc/redis/redis.conf")).replace("10.0.0.2", "127.0.0.1")
    conf = conf.replace("tls-port 6379", f"tls-port {port}") + f"dir {tmp_path}\n"
    (tmp_path / "redis.conf").write_text(conf)
    log = open(tmp_path / "redis.log", "w")
    proc = subprocess.Popen([REDIS_SERVER, str(tmp_path / "redis.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        def client(user: str, role: str):
            return redis.Redis(host="127.0.0.1", port=port, username=user, ssl=True, ssl_ca_certs=str(ca),
                               password=(etc / "zimage" / f"{role}.pw").read_text().strip(), socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                assert client("default", "admin").ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert client("zimage-worker", "worker").ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client("zimage-client", "client").execute_command("FLUSHALL")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, username="zimage-worker", password="wrong", ssl=True,
                        ssl_ca_certs=str(ca), socket_timeout=5).ping()
        info = client("default", "admin").info("persistence")
        assert info["aof_enabled"] == 1

        # step 5's inspections as written, in the ops user's environment: no worker runs here, so none answers
        # (exit 69, said so), but Redis refuses the ops user nothing on the way (it used to: kombu's sweep lock)
        admin = client("default", "admin")
        admin.acl_log_reset()
        env = {"PATH": f"{REPO / '.runtime' / 'venv' / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
               "ZIMAGE_BROKER": f"rediss://zimage-ops@127.0.0.1:{port}/0",
               "ZIMAGE_BROKER_PASSWORD_FILE": str(etc / "zimage" / "ops.pw"),
               "ZIMAGE_TLS_CA": str(etc / "tls" / "ca.crt")}
        inspections = [c for c in block_after("### 5. Watch it").splitlines() if " inspect " in c]
        assert len(inspections) == 2, inspections
        for command in inspections:
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=REPO,
                                    env=env)
            said = result.stdout + result.stderr
            assert result.returncode == 69 and "No nodes replied within time constraint" in said, said
            assert "permission" not in said.lower(), said
        assert not [e for e in admin.acl_log(count=100) if e.get("username") == "zimage-ops"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
