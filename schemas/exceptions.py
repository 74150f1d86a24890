"""Errors of the schemas package, and the root error class of all of streamlearn.

Every error streamlearn raises on purpose derives from :class:`StreamlearnError`, so an
application can catch one class; each package adds its own subclasses in its own
``exceptions.py``.
"""

from __future__ import annotations


class StreamlearnError(Exception):
    """Root of every error raised on purpose by streamlearn."""


class SchemaError(StreamlearnError):
    """A schema is malformed, unknown, or a record does not fit it."""


class SchemaNotFoundError(SchemaError):
    """A schema id, subject or version is not in the registry."""

    def __init__(self, message: str, error_code: int = 40403) -> None:
        super().__init__(message)
        self.error_code = error_code


class SubjectNotFoundError(SchemaNotFoundError):
    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' not found.", error_code=40401)
        self.subject = subject


class VersionNotFoundError(SchemaNotFoundError):
    def __init__(self, subject: str, version: object) -> None:
        super().__init__(f"Version {version} not found for subject '{subject}'.", error_code=40402)


class InvalidSchemaError(SchemaError):
    """The schema text is not a valid Avro schema (Confluent error 42201)."""

    error_code = 42201


class IncompatibleSchemaError(SchemaError):
    """Registering the schema would break the subject's compatibility mode (Confluent 409).

    ``messages`` lists every incompatibility found, each naming the offending field.
    """

    error_code = 409

    def __init__(self, subject: str, mode: str, messages: list[str]) -> None:
        self.subject = subject
        self.mode = mode
        self.messages = messages
        super().__init__(
            f"Schema being registered is incompatible with an earlier schema for subject '{subject}' "
            f"(compatibility {mode}): " + "; ".join(messages)
        )


class RecordValidationError(SchemaError):
    """A record does not match its schema; ``field`` names the offending field path."""

    def __init__(self, schema_name: str, field: str, value: object, reason: str) -> None:
        self.schema_name = schema_name
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        where = f"{schema_name}.{field}" if field else schema_name
        super().__init__(f"{where}: {reason} (got {shown})")


class FramingError(SchemaError):
    """Bytes are not a Confluent-framed Avro record. Subclasses say which part is wrong."""


class BadMagicByteError(FramingError):
    pass


class ShortPayloadError(FramingError):
    pass


class UnknownSchemaIdError(FramingError):
    pass


class TruncatedRecordError(FramingError):
    """The Avro body ends early, has trailing garbage, or declares absurd lengths/counts."""


class RegistryUnavailableError(StreamlearnError):
    """The schema registry cannot be reached. Retry with backoff; never dead-letter for this."""


class MalformedRecordError(FramingError):
    """The Avro body is the right length but not a valid encoding (bad union index, bad UTF-8...)."""


class InvalidSubjectError(SchemaError):
    """A subject name the registry will not store: empty, over 255 characters, or with control characters
    (Confluent's invalid-subject error, 42208)."""

    error_code = 42208


class InvalidVersionError(SchemaError):
    """A version argument is neither a positive integer nor 'latest' (Confluent 42202)."""

    error_code = 42202


class InvalidCompatibilityLevelError(SchemaError):
    """A compatibility level is not one of the Avro modes (Confluent 42203)."""

    error_code = 42203


class RegistryStoreError(StreamlearnError):
    """The registry's backing store failed or is corrupt (Confluent 500). Not retryable by itself."""

    error_code = 50001


class IncompatibleReaderError(SchemaError):
    """A deserializer's reader schema cannot read records written with the record's writer schema."""


class ConfigError(StreamlearnError):
    """A setting has a value of the wrong type or out of range.

    Defined here (and re-exported by ``streaming.config``) so that :mod:`schemas.access`, which every
    server uses for keys, can report a bad key setting without importing ``streaming``.
    """


class AccessError(StreamlearnError):
    """A request was refused by :mod:`schemas.access`; ``status`` is the HTTP status to answer.

    Messages are built from constants, scope names and tenant ids only: never from a key.
    """

    status: int = 403

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class UnauthenticatedError(AccessError):
    """No usable credentials (401)."""

    status = 401


class AccessDeniedError(AccessError):
    """Credentials unknown, or the key lacks the scope or the tenant of what it asked for (403)."""

    status = 403
