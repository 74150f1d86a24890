"""Kafka client security settings (TLS, SASL) as kafka-python keyword arguments.

Why one function: producers, consumers and admin clients are built in a dozen places; each passes
``**kafka_security(settings)`` so a cluster that requires SASL/SCRAM over TLS (docker-compose's
external listener) is reachable by every streamlearn process with the same four env vars. The
password comes from ``STREAMLEARN_KAFKA_SASL_PASSWORD`` (env or config file), never from argv.
"""

from __future__ import annotations

from typing import Any

from streaming.config import ConfigError, Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def kafka_security(settings: Settings) -> dict[str, Any]:
    """kafka-python client kwargs for ``settings``; ``{}`` for PLAINTEXT (the default).

    Every kafka-python client of this code base is built with these kwargs, so this is also where the
    library fixes of :mod:`streaming.kafka_compat` are made sure of (idempotent; reconnects spaced at most
    a second apart among them) before the client exists.
    """
    from streaming.kafka_compat import install

    install()
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"setting 'kafka_security_protocol' (env STREAMLEARN_KAFKA_SECURITY_PROTOCOL) is "
                          f"{protocol!r}; use one of {list(PROTOCOLS)}")
    if protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol.endswith("SSL"):
        out["ssl_check_hostname"] = True
        if settings.kafka_ssl_cafile is not None:
            if not settings.kafka_ssl_cafile.is_file():
                raise ConfigError(f"setting 'kafka_ssl_cafile' (env STREAMLEARN_KAFKA_SSL_CAFILE): "
                                  f"{settings.kafka_ssl_cafile} is not a file; point it at the CA bundle")
            out["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    if protocol.startswith("SASL"):
        mechanism = settings.kafka_sasl_mechanism.upper()
        if mechanism not in MECHANISMS:
            raise ConfigError(f"setting 'kafka_sasl_mechanism' (env STREAMLEARN_KAFKA_SASL_MECHANISM) is "
                              f"{mechanism!r}; use one of {list(MECHANISMS)}")
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
            raise ConfigError("settings 'kafka_sasl_username' and 'kafka_sasl_password' (env "
                              "STREAMLEARN_KAFKA_SASL_USERNAME / STREAMLEARN_KAFKA_SASL_PASSWORD) are required "
                              f"with security protocol {protocol}")
        out.update(sasl_mechanism=mechanism, sasl_plain_username=settings.kafka_sasl_username,
                   sasl_plain_password=settings.kafka_sasl_password)
    return out
