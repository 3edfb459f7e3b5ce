"""The broker's users as a Redis 7 ACL file: what each role may touch, and nothing else.

- client (zimage-batch): put jobs on the queue and read, then delete, their results. It cannot take jobs off
  the queue, see other state (the unacknowledged jobs, the workers' control channels) or run admin commands.
- worker (zimage-worker): take jobs, acknowledge them, put lost ones back, store results, answer `celery inspect`.
- ops (celery inspect, Flower): read queue depth, ask workers (control), watch events; no admin commands.
The 'default' user is the administrator, with a password of its own (or a random one nobody knows): Redis 7.0
replays its append-only file as 'default' after a restart, and with 'default' switched off it drops every
transaction in it (Debian's 7.0.15 does: the unacknowledged jobs would vanish on a restart).
Passwords are stored hashed (SHA-256); the file never holds them in clear.

    python -m zimage_queue.acl client:zimage-client:/etc/zimage/client.pw \\
        worker:zimage-worker:/etc/zimage/worker.pw ops:zimage-ops:/etc/zimage/ops.pw \\
        admin:default:/etc/zimage/admin.pw > /etc/redis/users.acl
"""
from __future__ import annotations

import hashlib
import secrets
import sys
from pathlib import Path

from .app import QUEUE

RESULTS = "celery-task-meta-*"           # Celery's result keys (and their pub/sub channels)
CONNECT = "+ping +hello +auth +client|setname +select +info +time"

RULES = {
    # root: connect only; each selector (…) grants a few commands on a few keys
    "client": (f"resetkeys resetchannels -@all {CONNECT} "
               f"({QUEUE}-rules) ({RESULTS}-rules)"),
    "worker": (f"resetkeys resetchannels -@all {CONNECT} +@keyspace +@read +@write +@list +@hash +@set "
               f"+@sortedset +@string +@pubsub +@transaction +@scripting +@connection -@dangerous "
               f"~{QUEUE}* ~unacked ~unacked_index ~unacked_mutex ~_kombu.binding* "
               f"~{RESULTS} ~*.celery.pidbox* &*"),
    "ops": (f"resetkeys resetchannels -@all {CONNECT} +@read +@write +@list +@set +@sortedset +@pubsub +@keyspace "
            f"+@connection +@transaction +@scripting -@dangerous %R~* ~*.celery.pidbox* ~_kombu.binding* &*"),
}
SELECTORS = {
    f"{QUEUE}-rules": f"~{QUEUE} +lpush",
    f"{RESULTS}-rules": f"~{RESULTS} +get +mget +del +exists",
}


def rules(role: str) -> str:
    text = RULES[role]
    for name, selector in SELECTORS.items():
        text = text.replace(f"({name})", f"({selector})")
    return text


def user_line(role: str, name: str, password: str) -> str:
    if role not in RULES:
        raise ValueError(f"unknown role {role!r}; the roles are {', '.join(RULES)}")
    if not password or any(c.isspace() for c in password):
        raise ValueError(f"{name}: the password must be non-empty and without spaces")
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
    return f"user {name} on #{digest} {rules(role)}"


def acl_file(users: list[tuple[str, str, str]], admin_password: str | None = None) -> str:
    """users: (role, name, password); 'default' is the administrator, with admin_password or a random one."""
    admin = hashlib.sha256((admin_password or secrets.token_hex(32)).encode("utf-8")).hexdigest()
    lines = [f"user default on #{admin} ~* &* +@all"]
    lines += [user_line(role, name, password) for role, name, password in users]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a.count(":") < 2 for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    users, admin = [], None
    for arg in argv:
        role, name, path = arg.split(":", 2)
        password = Path(path).read_text(encoding="utf-8").strip("\r\n")
        if role == "admin":
            admin = password
        else:
            users.append((role, name, password))
    sys.stdout.write(acl_file(users, admin))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
