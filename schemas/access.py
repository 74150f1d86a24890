"""API keys, scopes and tenants: the one key mechanism of every streamlearn HTTP server.

Why here, in ``schemas``: the schema registry's REST server lives in ``schemas/`` and nothing may
import upward, so the mechanism the gateway (``ingest``), serving HTTP (``serving``) and the registry
all share has to sit in the bottom layer. It needs nothing but the standard library.

A key entry is ``name:token[:scopes[:tenant]]``; entries are comma separated (env
``STREAMLEARN_KEYS``) or one per line (the file named by ``STREAMLEARN_KEYS_FILE``; ``#`` starts a
comment). ``scopes`` is ``+`` separated, ``*`` (the default) meaning every scope:

* ``ingest`` (every kind) or ``ingest.weblog`` / ``ingest.sensor`` / ``ingest.image`` (one kind);
* ``predict`` (serving HTTP);
* ``schema-read`` and ``schema-admin`` (registry; admin implies read);
* ``query``, ``train``, ``process`` and ``admin`` (the control API, ``streamlearn api serve``:
  read features/predictions, start training jobs, start replay jobs, promote a namespace; ``admin``
  implies the other three).

``tenant`` (``[a-z][a-z0-9-]{0,30}``) confines the key to the names under ``<tenant>.``; ``*`` makes
an operator key that owns every tenant's names (the platform's own key to the registry). Topics
``<topic_prefix><tenant>.weblog.raw``, subjects ``<topic_prefix><tenant>.weblog.raw-value``, models
``<tenant>.churn``. An entry without a tenant belongs to the default tenant, which owns every name
whose first dot-separated part is not a configured tenant, so a single-tenant setup needs nothing.

Only SHA-256 digests of tokens are kept, so a token cannot leak through a repr, a log line, a
metric label or an error message; comparison is constant time over every entry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from schemas.exceptions import AccessDeniedError, ConfigError, UnauthenticatedError

#: Every scope a key may carry (``*`` = all of them).
SCOPES: frozenset[str] = frozenset({"ingest", "ingest.weblog", "ingest.sensor", "ingest.image", "predict",
                                    "schema-read", "schema-admin", "query", "train", "process", "admin"})
#: Scope -> the narrower scopes it implies.
_IMPLIES: dict[str, frozenset[str]] = {
    "ingest": frozenset({"ingest.weblog", "ingest.sensor", "ingest.image"}),
    "schema-admin": frozenset({"schema-read"}),
    "admin": frozenset({"query", "train", "process"}),
}
DEFAULT_TENANT = ""
#: Label value of the default tenant in metrics.
DEFAULT_TENANT_LABEL = "default"
#: Metrics keep at most this many tenant label values; the rest fold into "other".
MAX_TENANT_LABELS = 64

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TENANT_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
#: Tenant ids that are the first part of a platform name: a tenant's names are ``<tenant>.<name>``, so a
#: tenant ``weblog`` owned ``weblog.raw`` (the default tenant's topic and its registry subject), ``models``
#: the ``models.updates`` topic serving follows, ``stream`` the live stream groups. Kept equal to the
#: names of streaming/topics.py and the workers' groups by tests/test_tenant_names.py.
RESERVED_TENANTS = frozenset({"weblog", "sensor", "image", "models", "serving", "stream"})


def tenant_problem(tenant: str) -> str | None:
    """Why ``tenant`` cannot be a tenant id, or None when it can."""
    if not TENANT_RE.match(tenant):
        return "is not [a-z][a-z0-9-]{0,30}"
    if tenant in RESERVED_TENANTS:
        return (f"is reserved: the platform's own names start with {tenant!r}. (reserved: "
                f"{', '.join(sorted(RESERVED_TENANTS))}); pick another id")
    return None
# RFC 6750 b64token: the characters a bearer token may use.
TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


@dataclass(frozen=True)
class Principal:
    """Who sent a request: safe to log. Never holds the token."""

    name: str
    scopes: frozenset[str] = frozenset({"*"})
    tenant: str = DEFAULT_TENANT
    #: An operator key (tenant ``*`` in its entry): owns every tenant's names, publishes as the default tenant.
    all_tenants: bool = False

    def allows(self, scope: str) -> bool:
        """Whether this key carries ``scope`` (directly, through ``*``, or through a wider scope)."""
        if "*" in self.scopes or scope in self.scopes:
            return True
        return any(scope in _IMPLIES.get(s, ()) for s in self.scopes)

    @property
    def prefix(self) -> str:
        """The prefix of this tenant's names ("" for the default tenant)."""
        return tenant_prefix(self.tenant)

    @property
    def tenant_label(self) -> str:
        return self.tenant or DEFAULT_TENANT_LABEL


#: The principal of a server that runs without keys (loopback only): may do everything.
ANONYMOUS = Principal("anonymous")


def tenant_prefix(tenant: str) -> str:
    """``acme`` -> ``acme.``; the default tenant has no prefix."""
    return f"{tenant}." if tenant else ""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split("+") if s.strip())
    unknown = sorted(scopes - SCOPES - {"*"})
    if not scopes or unknown:
        raise ConfigError(f"{where}: unknown or empty scopes {unknown}; use '*' or '+'-separated names "
                          f"from {sorted(SCOPES)}")
    return scopes


class KeyTable:
    """The accepted keys, as digests, each mapped to its :class:`Principal`.

    ``setting``/``env`` name where the entries came from, for error messages; ``default_scopes`` is
    what an entry without scopes gets (the gateway's legacy ``STREAMLEARN_INGEST_TOKENS`` entries get
    ``ingest`` only).
    """

    def __init__(self, spec: str = "", *, setting: str = "keys", env: str = "STREAMLEARN_KEYS",
                 default_scopes: Iterable[str] = ("*",), entries: Iterable[str] | None = None) -> None:
        self.setting, self.env = setting, env
        self._entries: list[tuple[bytes, Principal]] = []
        raw = list(entries) if entries is not None else (spec or "").split(",")
        for position, text in enumerate(raw, start=1):
            self._add(text.strip(), position, frozenset(default_scopes))

    def _where(self, position: int) -> str:
        return f"setting '{self.setting}' (env {self.env}): entry {position}"

    def _add(self, entry: str, position: int, default_scopes: frozenset[str]) -> None:
        if not entry:
            return
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) == 1:
            name, token, scopes, tenant = f"token#{position}", parts[0], default_scopes, DEFAULT_TENANT
        elif len(parts) <= 4:
            name, token = parts[0], parts[1]
            scopes = parse_scopes(parts[2], self._where(position)) if len(parts) > 2 and parts[2] else default_scopes
            tenant = parts[3] if len(parts) > 3 else DEFAULT_TENANT
        else:
            raise ConfigError(f"{self._where(position)} has more than 4 ':'-separated parts; "
                              "write name:token[:scopes[:tenant]]")
        if len(parts) > 1 and not NAME_RE.match(name):
            raise ConfigError(f"{self._where(position)} has a name that is not 1-64 characters of "
                              "[A-Za-z0-9_.-]; write entries as name:token[:scopes[:tenant]] or token")
        if not TOKEN_RE.match(token):
            raise ConfigError(f"{self._where(position)}: the token is empty or has characters a bearer "
                              "token cannot carry; use [A-Za-z0-9-._~+/]")
        all_tenants = tenant == "*"
        if all_tenants:
            tenant = DEFAULT_TENANT
        if tenant and (problem := tenant_problem(tenant)) is not None:
            raise ConfigError(f"{self._where(position)}: the tenant {tenant!r} {problem} (or '*' for every tenant)")
        if name in self.names:
            raise ConfigError(f"setting '{self.setting}' (env {self.env}): name {name!r} appears twice; "
                              "give every key its own name")
        digest = _digest(token)
        if any(hmac.compare_digest(digest, d) for d, _ in self._entries):
            raise ConfigError(f"{self._where(position)}: the same token is configured twice; "
                              "give every key its own token")
        self._entries.append((digest, Principal(name, scopes, tenant, all_tenants)))

    @classmethod
    def merged(cls, *tables: KeyTable) -> KeyTable:
        """One table holding the entries of ``tables`` (names must stay unique)."""
        out = cls()
        for table in tables:
            for digest, principal in table._entries:
                if principal.name in out.names:
                    raise ConfigError(f"key name {principal.name!r} is configured in two settings; rename one")
                out._entries.append((digest, principal))
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"KeyTable({len(self._entries)} keys: {self.names})"

    @property
    def names(self) -> list[str]:
        return [p.name for _, p in self._entries]

    @property
    def tenants(self) -> frozenset[str]:
        """The configured tenants (the default tenant excluded)."""
        return frozenset(p.tenant for _, p in self._entries if p.tenant)

    def tenant_label(self, principal: Principal) -> str:
        """A bounded metrics label for ``principal``'s tenant."""
        if not principal.tenant:
            return DEFAULT_TENANT_LABEL
        ordered = sorted(self.tenants)[:MAX_TENANT_LABELS]
        return principal.tenant if principal.tenant in ordered else "other"

    # -- authentication --------------------------------------------------------------------------
    def _lookup(self, token: str) -> Principal | None:
        given = _digest(token)
        found: Principal | None = None
        for digest, principal in self._entries:
            # Compare against every entry so timing does not depend on where a match is.
            if hmac.compare_digest(digest, given) and found is None:
                found = principal
        return found

    def authenticate(self, authorization: str | None, *, allow_basic: bool = False) -> Principal:
        """Map an ``Authorization`` header value to its principal.

        ``Bearer <token>``; with ``allow_basic`` also ``Basic base64(name:token)`` (what Confluent
        registry clients send for ``basic.auth.user.info``). Raises :class:`UnauthenticatedError`
        (401) for a missing or malformed header and :class:`AccessDeniedError` (403) for an unknown key.
        """
        hint = f"send 'Authorization: Bearer <token>' with a key of {self.env}"
        if authorization is None or not authorization.strip():
            raise UnauthenticatedError(f"missing Authorization header; {hint}")
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if allow_basic and scheme.lower() == "basic" and credentials:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, ValueError) as exc:
                raise UnauthenticatedError("malformed Basic credentials; send base64(name:token)") from exc
            name, _, token = decoded.partition(":")
            if not TOKEN_RE.match(token):
                raise UnauthenticatedError("malformed Basic credentials; send base64(name:token)")
            found = self._lookup(token)
            if found is None or (name and name != found.name):
                raise AccessDeniedError("the key is not accepted by this server; check the key")
            return found
        if scheme.lower() != "bearer" or not credentials or not TOKEN_RE.match(credentials):
            raise UnauthenticatedError(f"malformed Authorization header; {hint}")
        found = self._lookup(credentials)
        if found is None:
            raise AccessDeniedError("the key is not accepted by this server; check the key")
        return found

    # -- authorization ---------------------------------------------------------------------------
    def owns(self, principal: Principal, name: str) -> bool:
        """Whether ``name`` (a model, or a topic/subject without the global prefix) is the principal's.

        A tenant owns the names under ``<tenant>.``; the default tenant owns every name whose first
        dot-separated part is not a configured tenant.
        """
        if principal.all_tenants:
            return True
        if principal.tenant:
            return name.startswith(principal.prefix) and len(name) > len(principal.prefix)
        return name.split(".", 1)[0] not in self.tenants

    def require(self, principal: Principal, scope: str, name: str | None = None) -> None:
        """Raise :class:`AccessDeniedError` unless ``principal`` has ``scope`` (and owns ``name``)."""
        if not principal.allows(scope):
            raise AccessDeniedError(f"key {principal.name!r} lacks the {scope!r} scope; use a key with it")
        if name is not None and not self.owns(principal, name):
            raise AccessDeniedError(f"key {principal.name!r} (tenant {principal.tenant_label!r}) may not "
                                    f"use {name[:80]!r}; its names start with {principal.prefix or '(no tenant)'!r}")


def read_key_file(path: Path) -> list[str]:
    """The entries of a key file: one ``name:token[:scopes[:tenant]]`` per line, ``#`` comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"setting 'keys_file' (env STREAMLEARN_KEYS_FILE): cannot read {path} "
                          f"({type(exc).__name__}); point it at a readable file") from exc
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def load_keys(spec: str, file: Path | None) -> KeyTable:
    """The table of ``STREAMLEARN_KEYS`` plus the entries of ``STREAMLEARN_KEYS_FILE``."""
    tables = [KeyTable(spec)]
    if file is not None:
        tables.append(KeyTable(setting="keys_file", env="STREAMLEARN_KEYS_FILE", entries=read_key_file(file)))
    return KeyTable.merged(*tables)


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def bind_host(requested: str, keys: KeyTable, server: str, setting: str) -> tuple[str, str | None]:
    """The address a server binds, and a warning to log when it overrides ``requested``.

    Without a key a server binds loopback only (anyone who reaches it could otherwise read and
    write), and says so.
    """
    if keys or requested in LOOPBACK:
        return requested, None
    return "127.0.0.1", (f"{server}: no key is configured (STREAMLEARN_KEYS / STREAMLEARN_KEYS_FILE), so it "
                         f"binds 127.0.0.1 only instead of {requested!r} ({setting}); configure keys to "
                         "serve other hosts")
