"""The broker's address and secrets, and a first connection that explains Redis's refusals.

The password never comes from the command line (ps and the shell history show it): ZIMAGE_BROKER_PASSWORD_FILE
names a file holding it, or ZIMAGE_BROKER_PASSWORD holds it, or ZIMAGE_BROKER (the whole URL) is set in the
environment. A URL given with --broker may name the user but not the password.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

ENV_URL = "ZIMAGE_BROKER"
ENV_PASSWORD = "ZIMAGE_BROKER_PASSWORD"
ENV_PASSWORD_FILE = "ZIMAGE_BROKER_PASSWORD_FILE"
ENV_CA, ENV_CERT, ENV_KEY = "ZIMAGE_TLS_CA", "ZIMAGE_TLS_CERT", "ZIMAGE_TLS_KEY"
CONNECT_TIMEOUT = 5.0


class BrokerError(RuntimeError):
    """A broker setting or answer the user must fix; the message says how."""


@dataclass(frozen=True)
class Broker:
    url: str = field(repr=False)          # with the password: handed to Celery and redis-py, never printed
    shown: str                            # the same address without the password, for messages and logs
    user: str | None
    password: str | None = field(repr=False, default=None)
    tls: dict | None = None               # redis-py's ssl_* options for rediss://

    def redact(self, text: str) -> str:
        """text with the password blanked out, wherever it appears (an exception may quote the URL)."""
        if self.password:
            text = text.replace(self.url, self.shown).replace(quote(self.password, safe=""), "***")
            text = text.replace(self.password, "***")
        return text


def load_broker(cli_url: str | None, tls_ca: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None, env=os.environ) -> Broker:
    """The broker from --broker or ZIMAGE_BROKER, its password from the environment or a file."""
    url = cli_url or env.get(ENV_URL)
    if not url:
        raise BrokerError(f"name the broker: --broker redis://USER@HOST:6379/0 (or rediss:// for TLS), or set "
                          f"{ENV_URL}")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise BrokerError(f"the broker must be a redis:// or rediss:// URL, not {parts.scheme or url!r}")
    if cli_url and parts.password:
        raise BrokerError(f"the password is written in --broker, where ps and the shell history show it to "
                          f"anyone on this machine: remove it from the URL and put it in a file named by "
                          f"{ENV_PASSWORD_FILE} (readable by you only), or in {ENV_PASSWORD}")
    password = unquote(parts.password) if parts.password else None
    if env.get(ENV_PASSWORD_FILE):
        path = Path(env[ENV_PASSWORD_FILE])
        try:
            password = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as e:
            raise BrokerError(f"{ENV_PASSWORD_FILE}={path}: cannot read the password file ({e.strerror})") from e
    elif env.get(ENV_PASSWORD):
        password = env[ENV_PASSWORD]
    user = unquote(parts.username) if parts.username else None
    host = parts.hostname or "localhost"
    hostport = f"[{host}]" if ":" in host else host
    if parts.port:
        hostport += f":{parts.port}"
    who = quote(user or "", safe="")
    netloc = f"{who}:{quote(password, safe='')}@{hostport}" if password else (f"{who}@{hostport}" if user else hostport)
    shown_netloc = f"{who}:***@{hostport}" if password else (f"{who}@{hostport}" if user else hostport)
    path = parts.path or "/0"
    full = urlunsplit((parts.scheme, netloc, path, parts.query, ""))
    shown = urlunsplit((parts.scheme, shown_netloc, path, parts.query, ""))
    tls = None
    ca, cert, key = tls_ca or env.get(ENV_CA), tls_cert or env.get(ENV_CERT), tls_key or env.get(ENV_KEY)
    if parts.scheme == "rediss":
        tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for option, value, name in (("ssl_ca_certs", ca, "CA"), ("ssl_certfile", cert, "certificate"),
                                    ("ssl_keyfile", key, "key")):
            if value:
                if not Path(value).is_file():
                    raise BrokerError(f"the TLS {name} file {value} does not exist")
                tls[option] = str(value)
        if bool(cert) != bool(key):
            raise BrokerError("a client certificate needs both --tls-cert and --tls-key "
                              f"({ENV_CERT} and {ENV_KEY})")
    elif ca or cert or key:
        raise BrokerError(f"TLS files were given but the broker URL is {parts.scheme}://, which sends everything "
                          f"in clear: use rediss:// for TLS")
    return Broker(full, shown, user, password, tls)


def connect(broker: Broker, timeout: float = CONNECT_TIMEOUT):
    """A redis-py client for the broker, already checked with PING; BrokerError naming the fix otherwise."""
    import redis

    client = redis.Redis.from_url(broker.url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                  **(broker.tls or {}))
    try:
        client.ping()
    except Exception as e:                       # every refusal below becomes one clear sentence
        client.close()
        raise BrokerError(explain(broker, e)) from None
    return client


def explain(broker: Broker, error: Exception) -> str:
    """Redis's refusal in words that say what to change."""
    import redis

    text = broker.redact(str(error) or type(error).__name__)
    where = broker.shown
    who = f"user {broker.user!r}" if broker.user else "the default user"
    if isinstance(error, redis.AuthenticationError) or "WRONGPASS" in text or "invalid username-password" in text:
        return (f"{where} refused {who}'s password (WRONGPASS): check the password in {ENV_PASSWORD_FILE} or "
                f"{ENV_PASSWORD}, and that the user exists and is 'on' in the broker's ACL file")
    if "NOAUTH" in text or "Authentication required" in text:
        return (f"{where} requires a password and none was given: put {who}'s password in a file named by "
                f"{ENV_PASSWORD_FILE}, or in {ENV_PASSWORD}")
    if isinstance(error, redis.exceptions.NoPermissionError) or "NOPERM" in text:
        return f"{where}: {who} may not do this ({text}): the broker's ACL must grant it (see docs/scale_out.md)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"{where}: the broker's TLS certificate was not trusted ({text}): name the CA that signed it with "
                f"--tls-ca FILE or {ENV_CA}")
    tls_words = ("SSL", "WRONG_VERSION_NUMBER", "record layer", "handshake", "EOF occurred")
    if broker.tls and any(w in text for w in tls_words):
        return (f"{where}: the TLS handshake failed ({text}): does the broker listen with TLS on this port "
                f"(tls-port), and is this its address?")
    if isinstance(error, redis.ConnectionError) and not broker.tls and (
            "closed by server" in text or "reading from" in text or "Connection reset" in text):
        return (f"{where} closed the connection without answering as Redis: if the broker requires TLS, use "
                f"rediss://HOST:PORT with --tls-ca FILE ({ENV_CA}); otherwise check the port ({text})")
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return f"{where} cannot be reached ({text}): is redis-server running there, and the port open to you?"
    return f"{where}: {type(error).__name__}: {text}"
