"""`streamlearn up`'s preflight: settings every worker needs are checked before anything starts.

Why: a worker started with a setting it cannot run with dies at once, and a supervisor restarting it
turns one missing setting into a crash loop whose reason sits in a log file. So ``up`` decides first,
per service:

* a setting that is wrong (a malformed ``ingest_tokens`` entry) is an error: ``up`` refuses to start
  and prints one line per problem (exit non-zero);
* a setting that is merely missing and has a safe local default is filled in and said: the gateway
  without ``ingest_tokens`` gets a token minted into ``HOME/secrets/ingest.token`` (mode 0600, reused
  on the next ``up``), whose path is printed;
* a service that cannot run here (its port is taken by another process) is left out, and ``up`` says
  which and why; everything else starts.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from streaming.config import ConfigError, Settings
from streamlearn.stack import Service

TOKEN_NAME = "up"


@dataclass
class Preflight:
    services: list[Service]
    errors: list[str] = field(default_factory=list)  # refuse to start: one line each
    notes: list[str] = field(default_factory=list)  # what was filled in or left out, and why


def token_file(settings: Settings) -> Path:
    return settings.home / "secrets" / "ingest.token"


def mint_token(settings: Settings) -> Path:
    """A bearer token in a 0600 file under HOME (created once, then reused); returns its path."""
    path = token_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if not path.exists() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    return path


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


def check(settings: Settings, services: list[Service]) -> Preflight:
    """Decide what ``up`` starts; see the module docstring."""
    result = Preflight([])
    if settings.keys or settings.keys_file:  # every server reads them: a bad entry crash-looped each one
        from schemas.access import load_keys

        try:
            load_keys(settings.keys, settings.keys_file)
        except ConfigError as exc:
            result.errors.append(f"keys: {exc}")
            return result
    for svc in services:
        if svc.name == "gateway":
            if not settings.ingest_tokens.strip():
                path = mint_token(settings)
                svc.env["STREAMLEARN_INGEST_TOKENS"] = f"{TOKEN_NAME}:{path.read_text().strip()}"
                result.notes.append(f"gateway: setting ingest_tokens (STREAMLEARN_INGEST_TOKENS) is empty; minted a "
                                    f"token into {path} (mode 0600): send `Authorization: Bearer <its contents>`")
            else:
                from ingest.gateway.auth import TokenTable

                try:
                    TokenTable(settings.ingest_tokens)
                except ConfigError as exc:
                    result.errors.append(f"gateway: {exc}")
                    continue
            if _port_taken(settings.ingest_host, settings.ingest_port):
                result.notes.append(f"left out gateway: port {settings.ingest_port} on {settings.ingest_host} is in "
                                    "use by another process (another `up`?); set STREAMLEARN_INGEST_PORT")
                continue
        if svc.name == "registry" and _port_taken("127.0.0.1", settings.registry_port):
            result.notes.append(f"left out registry: port {settings.registry_port} is in use by another process; "
                                "set STREAMLEARN_REGISTRY_PORT (workers use the file registry under HOME anyway)")
            continue
        if svc.metrics_port and svc.name != "gateway" and _port_taken("127.0.0.1", svc.metrics_port):
            result.notes.append(f"{svc.name}: metrics port {svc.metrics_port} is in use; it serves /metrics on a "
                                "free port instead (see --metrics-base-port)")
            svc.metrics_port = 0
        result.services.append(svc)
    return result
