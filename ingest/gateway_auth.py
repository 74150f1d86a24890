"""Bearer-token authentication of the ingest gateway.

Tokens come from ``settings.ingest_tokens`` (``name:token`` or bare ``token``, comma separated).
Why the table keeps only SHA-256 digests: a token must never show up in a log line, a metrics
label, an error message or a repr, and the simplest way to guarantee that is to not keep the
plain token in any object the gateway holds after start-up. Comparison is constant time
(``hmac.compare_digest`` over every digest) so response timing does not reveal a prefix.

A request is identified afterwards by a :class:`Principal` whose ``name`` is the configured name,
or ``token#<n>`` (1-based position in the list) for unnamed tokens. That name is what rate limits
and idempotency keys are scoped by, and what logs may show.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from ingest.gateway_errors import AuthenticationError, ForbiddenError
from streaming.config import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# RFC 6750 b64token: the characters a bearer token may use.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a name that is safe to log. Never holds the token."""

    name: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """The accepted bearer tokens, as digests, with the principal each one maps to."""

    def __init__(self, spec: str) -> None:
        """Parse ``spec`` (the value of ``settings.ingest_tokens``).

        A bad entry raises :class:`streaming.config.ConfigError` at start-up; the message names the
        setting and the entry's position, never the entry's text (it may be a real token).
        """
        self._entries: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        for position, raw in enumerate((spec or "").split(","), start=1):
            entry = raw.strip()
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            name, token = name.strip(), token.strip()
            if not sep:
                name, token = f"token#{position}", entry
            elif not _NAME_RE.match(name):
                raise ConfigError(
                    f"setting 'ingest_tokens' (env STREAMLEARN_INGEST_TOKENS): entry {position} has a name "
                    "that is not 1-64 characters of [A-Za-z0-9_.-]; write entries as name:token or token"
                )
            if not _TOKEN_RE.match(token):
                raise ConfigError(
                    f"setting 'ingest_tokens' (env STREAMLEARN_INGEST_TOKENS): the token of entry {position} "
                    "is empty or has characters a bearer token cannot carry; use [A-Za-z0-9-._~+/]"
                )
            if name in names:
                raise ConfigError(
                    f"setting 'ingest_tokens' (env STREAMLEARN_INGEST_TOKENS): name {name!r} appears twice; "
                    "give every token its own name"
                )
            names.add(name)
            self._entries.append((_digest(token), Principal(name)))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable({len(self._entries)} tokens: {[p.name for _, p in self._entries]})"

    @property
    def names(self) -> list[str]:
        return [p.name for _, p in self._entries]

    def authenticate(self, authorization: str | None) -> Principal:
        """Map an ``Authorization`` header value to its principal.

        Raises :class:`AuthenticationError` (401) when the header is missing or not
        ``Bearer <token>``, and :class:`ForbiddenError` (403) when the token is unknown.
        """
        if authorization is None or not authorization.strip():
            raise AuthenticationError(
                "missing Authorization header; send 'Authorization: Bearer <token>' with a token "
                "from STREAMLEARN_INGEST_TOKENS"
            )
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials or not _TOKEN_RE.match(credentials):
            raise AuthenticationError(
                "malformed Authorization header; it must be 'Bearer <token>' with one token"
            )
        given = _digest(credentials)
        found: Principal | None = None
        for digest, principal in self._entries:
            # Compare against every entry so timing does not depend on where a match is.
            if hmac.compare_digest(digest, given) and found is None:
                found = principal
        if found is None:
            raise ForbiddenError("the bearer token is not accepted by this gateway; check the token")
        return found
