"""Many workers per consumer group on one machine: `streamlearn up --workers stream.sensor=3,serve.digits_cnn=2`.

Why processes and not threads: a stream worker is CPU-bound in Python (Avro decode, featurize), so
a second thread on the same interpreter adds nothing; a second process in the same consumer group
gets half of the partitions and a core of its own. Kafka's group protocol does the balancing; every
process derives its own static member id from the lowest free slot (``streaming.members``), so N
copies of the same command are N distinct members and a restarted copy takes its slot back.

The rule enforced here: a group never gets more workers than its topic has partitions. Kafka gives
each partition to one member, so a worker beyond the partition count owns nothing and idles (and
looks stuck in ``streamlearn status``). ``up`` refuses such a plan before starting anything, with
both numbers and what to change.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from streaming.config import ConfigError, Settings
from streaming.topics import KINDS, MODELS, raw_topic, requests_topic
from streamlearn.stack import Service

#: Most processes one group may get on one machine (a typo such as =100 must not fork a hundred).
MAX_WORKERS = 64
_ENTRY = re.compile(r"^(stream|serve)\.([A-Za-z0-9_-]+)=(\d+)$")


def parse_workers(text: str, models: list[str] | None = None) -> dict[str, int]:
    """``"stream.sensor=3,serve.digits_cnn=2"`` -> ``{"stream.sensor": 3, "serve.digits_cnn": 2}``.

    Raises ConfigError naming the bad entry and the groups that exist.
    """
    known = {f"stream.{k}" for k in KINDS} | {f"serve.{m}" for m in (models or list(MODELS))}
    out: dict[str, int] = {}
    for raw in text.split(","):
        entry = raw.strip().replace(" ", "")
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise ConfigError(f"--workers / STREAMLEARN_WORKERS: {entry!r} is not GROUP=N (e.g. stream.sensor=3)")
        group, n = f"{m.group(1)}.{m.group(2)}", int(m.group(3))
        if group not in known:
            raise ConfigError(f"--workers / STREAMLEARN_WORKERS: unknown group {group!r}; known: {sorted(known)}")
        if not 1 <= n <= MAX_WORKERS:
            raise ConfigError(f"--workers / STREAMLEARN_WORKERS: {group}={n}; a group runs 1 to {MAX_WORKERS} "
                              "processes (more belong on more machines: docs/SCALING.md)")
        if group in out:
            raise ConfigError(f"--workers / STREAMLEARN_WORKERS: {group} is given twice")
        out[group] = n
    return out


def group_of(service_name: str) -> str | None:
    """The ``--workers`` group of a ``streamlearn up`` service (``stream-sensor``, ``stream-sensor-2`` ->
    ``stream.sensor``); None for services that do not scale this way (trainers, gateway, registry)."""
    name = base_name(service_name)
    for role in ("stream", "serve"):
        if name.startswith(f"{role}-"):
            return f"{role}.{name[len(role) + 1:]}"
    return None


def topic_of(settings: Settings, group: str) -> str:
    """The topic a ``--workers`` group consumes (what its partition count is checked against)."""
    role, _, name = group.partition(".")
    return raw_topic(settings, name) if role == "stream" else requests_topic(settings, name)


def check_partitions(workers: dict[str, int], partitions_of: Callable[[str], int | None],
                     settings: Settings) -> None:
    """Refuse a group with more workers than its topic has partitions (one error naming every such group).

    ``partitions_of(group)`` is the partition count of the group's topic: the existing topic's when it
    exists, else what ``topics create`` will make (``settings.partitions``).
    """
    problems = []
    for group, n in sorted(workers.items()):
        have = partitions_of(group)
        if have is None:
            have = settings.partitions
        if n > have:
            problems.append(
                f"group {group} gets {n} workers but its topic {topic_of(settings, group)} has {have} partitions "
                f"(a worker beyond the partition count owns nothing and idles): run at most {have} workers, or "
                f"give the topic at least {n} partitions: STREAMLEARN_PARTITIONS={n} before the topics are created "
                f"(an existing topic: kafka-topics.sh --alter --partitions {n}, which moves keys to other "
                "partitions; docs/SCALING.md)")
    if problems:
        raise ConfigError("partitions >= workers per group: " + "; ".join(problems))


def expand(services: list[Service], workers: dict[str, int]) -> list[Service]:
    """N copies of each group's service: ``stream-sensor``, ``stream-sensor-2``, ...

    The first copy keeps the plain name (``--only stream-sensor`` and compose's service name mean the
    same worker). Extra copies get the next free metrics ports after the highest one in use.
    """
    ports = [s.metrics_port for s in services if s.metrics_port and s.name != "gateway"]
    next_port = max(ports) + 1 if ports else 0
    out: list[Service] = []
    for svc in services:
        out.append(svc)
        group = group_of(svc.name)
        for i in range(2, workers.get(group or "", 1) + 1):
            port = None
            if svc.metrics_port is not None:
                port = next_port if next_port else 0
                next_port = next_port + 1 if next_port else 0
            out.append(Service(f"{svc.name}-{i}", list(svc.args), svc.group, port, dict(svc.env)))
    return out


def base_name(service_name: str) -> str:
    """``stream-sensor-2`` -> ``stream-sensor``, ``serve-m-standby(-2)`` -> ``serve-m`` (what ``--only``
    matches); other names unchanged."""
    m = re.match(r"^((?:stream|serve)-.+)-(\d+)$", service_name)
    name = m.group(1) if m else service_name
    return name.removesuffix("-standby") if name.startswith("serve-") else name
