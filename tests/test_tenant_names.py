"""Reserved tenant ids: a tenant's names are ``<tenant>.<name>``, so no tenant id may be the first part of
a platform name (a tenant ``weblog`` owned the default tenant's ``weblog.raw`` and its registry subject)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.access import RESERVED_TENANTS, TENANT_RE, KeyTable, tenant_problem
from schemas.exceptions import ConfigError
from streaming import config
from streaming.topics import KINDS, declared_topics
from streaming.worker import default_group
from tests.helpers import ROOT


def test_every_platform_name_that_a_tenant_id_could_prefix_is_reserved(tmp_path: Path) -> None:
    settings = config.load({"home": tmp_path, "metrics_port": -1})
    names = [t.name for t in declared_topics(settings)] + [default_group(settings, k) for k in KINDS]
    names += [settings.group(f"serving.{m}") for m in ("weblog_classifier", "digits_cnn")]
    firsts = {n.split(".", 1)[0] for n in names}
    could_clash = {f for f in firsts if TENANT_RE.match(f)}  # model names carry '_', which no tenant id has
    assert could_clash == RESERVED_TENANTS
    script = (ROOT / "deploy" / "kafka" / "kafka-users.sh").read_text()
    listed = re.search(r'^RESERVED_TENANTS="([^"]*)"', script, re.M)
    assert listed is not None and set(listed.group(1).split()) == RESERVED_TENANTS


@pytest.mark.parametrize("tenant", sorted(RESERVED_TENANTS))
def test_a_reserved_tenant_id_is_refused_in_keys_and_settings(tenant: str, tmp_path: Path) -> None:
    assert tenant_problem(tenant) is not None and tenant_problem("acme") is None
    with pytest.raises(ConfigError, match=f"the tenant '{tenant}' is reserved"):
        KeyTable(f"wb:{'t' * 24}:*:{tenant}")
    with pytest.raises(ConfigError, match="is reserved"):
        config.load({"home": tmp_path, "tenant": tenant})
