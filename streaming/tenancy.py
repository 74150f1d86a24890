"""Client-side tenant scope: a tenant's Kafka clients touch only names under its prefix.

Why a client-side check when Kafka ACLs exist: the embedded broker (noida-db) has no authorizer
(it answers CreateAcls/DescribeAcls with SECURITY_DISABLED), so in development and tests nothing
else stops a tenant's process from reading another tenant's topics; and on Apache Kafka with
prefixed ACLs (docker-compose.yml, deploy/kafka/tenant-acls.sh) a foreign name would only fail
later, inside kafka-python, as a TopicAuthorizationFailed after connecting. The check here fails
first, with a message that names the setting, before any network call.

A process is tenant-scoped when ``STREAMLEARN_TENANT`` (setting ``tenant``) is set. Its names are
``Settings.namespace`` = ``<topic_prefix><tenant>.`` (``Settings.topic``/``group`` add it), the
same prefix the gateway publishes the tenant's events under and the ACLs grant. Unscoped
processes (the platform's own workers, single-tenant setups) are not checked.

What this is not: a security boundary against a tenant who controls its own process — it can
unset the variable or use kafka-python directly. On a shared cluster that boundary is the broker:
the tenant's SASL user and its prefixed ACLs (docs/SECURITY.md "Tenants on Kafka").
"""

from __future__ import annotations

from collections.abc import Iterable

from streaming.config import Settings
from streaming.exceptions import TenantScopeError


def scope(settings: Settings) -> str | None:
    """The prefix every name of this process must start with; None when it is not tenant-scoped."""
    return settings.namespace if settings.tenant else None


def allowed(settings: Settings, name: str) -> bool:
    """Whether a tenant-scoped process may use ``name`` (always True for an unscoped one)."""
    prefix = scope(settings)
    return prefix is None or (name.startswith(prefix) and len(name) > len(prefix))


def _refuse(settings: Settings, what: str, name: str, action: str) -> TenantScopeError:
    prefix = scope(settings)
    return TenantScopeError(
        f"tenant {settings.tenant!r} (setting 'tenant', env STREAMLEARN_TENANT) may only {action} {what}s under "
        f"{prefix!r}; {name!r} is outside it. Use the tenant's own names (Settings.topic/group add the prefix); "
        "a platform process runs without STREAMLEARN_TENANT")


def check_topics(settings: Settings, topics: Iterable[str], action: str) -> None:
    """Raise :class:`TenantScopeError` for the first topic outside the tenant's prefix."""
    for topic in topics:
        if not allowed(settings, topic):
            raise _refuse(settings, "topic", topic, action)


def check_group(settings: Settings, group: str | None) -> None:
    """A consumer group (None: no group) must be under the tenant's prefix."""
    if group is not None and not allowed(settings, group):
        raise _refuse(settings, "consumer group", group, "join")


def check_transactional_id(settings: Settings, transactional_id: str | None) -> None:
    """A transactional id (None: no transactions) must be under the tenant's prefix (the ACLs grant
    TransactionalId rights on that prefix only)."""
    if transactional_id and not allowed(settings, transactional_id):
        raise _refuse(settings, "transactional id", transactional_id, "use")
