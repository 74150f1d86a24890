"""True replay of a version's lineage from Kafka: re-read the raw offsets, re-featurize, re-encode.

For every lineage batch the raw topic is read at exactly the recorded partition and offset range
(explicit positions, no consumer group, nothing committed), dead-lettered offsets are skipped as
recorded, each record goes through ``get_featurizer(kind, version)`` starting from the featurizer
state the stream worker had *before* that batch (the state checkpointed in the manifest of the
partition's preceding batch; a fresh state for a partition's first batch), and the rows are
encoded exactly as the feature store writes them. The store's bytes are a pure function of the
rows, so the replayed bytes must hash to the sha256 recorded in the lineage; any difference
(different featurizer code, a record changed, a missing offset) raises LineageError naming the
batch. The replayed batches are written to ``replay_dir`` and trained on instead of the store's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from streaming.config import Settings
from streaming.store import BatchInfo, FeatureStore, StoredRow, batch_id_for, encode_rows
from trainer.exceptions import LineageError


def _state_before(store: FeatureStore, featurizer: Any, kind: str, namespace: str, rng: dict[str, Any]) -> Any:
    """The featurizer state the stream worker restored before reading ``rng``'s first offset."""
    previous = [(f, last) for f, last in store.ranges(kind, rng["topic"], int(rng["partition"]), namespace)
                if last < int(rng["first_offset"])]
    if not previous:
        return featurizer.new_state()
    first, last = max(previous, key=lambda r: r[1])
    bid = batch_id_for(rng["topic"], int(rng["partition"]), first, last)
    text = store.featurizer_state(kind, store.manifest(kind, bid, namespace), namespace)
    return featurizer.new_state() if text is None else featurizer.state_from_json(text)


def replay_entry(settings: Settings, entry: dict[str, Any], kind: str, featurizer_version: str,
                 replay_dir: Path, timeout_s: float = 60.0) -> BatchInfo:
    """Rebuild one lineage batch from Kafka into ``replay_dir``; raises LineageError on any mismatch."""
    from streaming.consumer import ErrorItem, Subscriber
    from streaming.eventtime import backfill_run
    from streaming.features import get_featurizer

    if len(entry.get("ranges", [])) != 1:
        raise LineageError(f"lineage: batch {entry['batch_id']} has {len(entry.get('ranges', []))} offset "
                           "ranges; replay supports exactly one (the stream worker writes one per batch)")
    rng = entry["ranges"][0]
    topic, partition = rng["topic"], int(rng["partition"])
    from streaming.topics import raw_topic

    if topic != raw_topic(settings, kind):  # lineage is data: it may not point a replay at another topic
        raise LineageError(f"lineage: batch {str(entry['batch_id'])[:80]} names topic {str(topic)[:100]!r}, not "
                           f"this kind's raw topic {raw_topic(settings, kind)!r}; the metadata is not trustworthy")
    first, last = int(rng["first_offset"]), int(rng["last_offset"])
    skip = {int(o) for o in rng.get("dead_letter_offsets", [])}
    fz = get_featurizer(kind, featurizer_version)
    store = FeatureStore(settings.feature_store)
    state = _state_before(store, fz, kind, entry.get("namespace") or "live", rng)
    rows: list[StoredRow] = []
    seen: set[int] = set()
    with Subscriber(settings, topic, start={"offset": first}, until={"offset": last + 1},
                    partitions=[partition]) as sub:
        for item in sub.iterate(idle_timeout_s=timeout_s):
            seen.add(item.offset)
            if item.offset in skip:
                continue
            if isinstance(item, ErrorItem):
                raise LineageError(f"lineage: {topic}[{partition}]@{item.offset} no longer decodes "
                                   f"({item.error}) but was featurized into batch {entry['batch_id']}")
            row = fz.featurize_event(item.value, state, backfill_run(item.headers))
            rows.append(StoredRow(row.x, row.labels, row.event_time_ms, row.key, topic, partition, item.offset))
    if not rows or (first not in seen and first not in skip):
        raise LineageError(f"lineage: offsets {first}..{last} of {topic}[{partition}] could not be read "
                           "(deleted by topic retention?); reproduce from the batch files instead")
    data = encode_rows(entry["batch_id"], rows, fz.n_features, list(fz.label_names))
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise LineageError(
            f"lineage: replaying {topic}[{partition}] offsets {first}..{last} through {fz.version} gives "
            f"sha256 {digest}, the version recorded {entry['sha256']} for batch {entry['batch_id']}; the "
            "featurizer or the records changed since training"
        )
    replay_dir.mkdir(parents=True, exist_ok=True)
    path = replay_dir / f"{entry['batch_id']}.avro"
    path.write_bytes(data)
    return BatchInfo(entry["batch_id"], path, {"sha256": digest, "record_count": len(rows),
                                               "ranges": entry["ranges"]})
