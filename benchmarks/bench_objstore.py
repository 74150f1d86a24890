"""Object storage vs the local directory: what one feature-store batch and one registry version cost
over ``s3://`` (moto's S3 server on localhost, started here) against the local store in the same run.

Per backend (baseline = local directory, ratio = s3 / local; no goal: the figure sizes the poll and
batch intervals, an S3 round trip being ~1000x a local fsync-free syscall):

* ``write_batch_ms``: median ``FeatureStore.write_batch`` of a 50-row sensor batch (local: fsync +
  rename; s3: HEAD + LIST + PUT data + conditional PUT manifest);
* ``poll_ms``: median ``batches_after`` (the trainer's per-second call) on the filled store;
* ``read_batch_ms``: median ``read_batch`` of one batch;
* ``publish_ms`` / ``verify_ms``: median ``ModelRegistry.publish`` / ``verify`` of a 1 MB fake version
  (lease + claim + upload + metadata + state CAS on s3).

moto runs in this process on the same 2 cores, so the s3 figures are an upper bound of the client's
cost plus a slow server, not a network figure.

    python -m benchmarks.bench_objstore     # JSON to stdout and reports/bench/objstore.json
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_report

BATCHES = 30
VERSIONS = 3


def _rows(first: int, n: int) -> list[Any]:
    from streaming.store import StoredRow

    return [StoredRow(x=np.arange(8, dtype=np.float32) + i, labels={"y": float(i)}, event_time_ms=1_700_000_000_000 + i,
                      key=f"k{i}", topic="t.sensor.raw", partition=0, offset=first + i) for i in range(n)]


def _spec(first: int, last: int) -> Any:
    from streaming.store import BatchSpec

    return BatchSpec(kind="sensor", topic="t.sensor.raw", partition=0, first_offset=first, last_offset=last,
                     featurizer_version="1", n_features=8, label_names=["y"], featurizer_state='{"w": 1}')


def _ms(fn: Any, times: int) -> float:
    out = []
    for _ in range(times):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def measure(store_root: Any, registry_root: Any, options: dict[str, Any] | None, tmp: Path) -> dict[str, float]:
    from streaming.model_registry import ModelRegistry
    from streaming.store import FeatureStore, read_batch

    store = FeatureStore(store_root, storage_options=options)
    writes = []
    for i in range(BATCHES):
        t = time.perf_counter()
        store.write_batch(_spec(i * 50, i * 50 + 49), _rows(i * 50, 50), created_at_ms=1_700_000_000_000 + i)
        writes.append((time.perf_counter() - t) * 1000)
    reader = FeatureStore(store_root, storage_options=options)
    infos = reader.batches("sensor")
    newest = infos[-4].batch_id
    poll = _ms(lambda: reader.batches_after("sensor", newest), 10)
    read = _ms(lambda: read_batch(infos[0].path), 10)
    reg = ModelRegistry(registry_root, storage_options=options, cache_dir=tmp / "cache") if options else \
        ModelRegistry(registry_root)
    publishes, verifies = [], []
    for v in range(VERSIONS):
        staging = reg.staging("m")
        (staging / "saved_model.pb").write_bytes(os.urandom(1000))
        (staging / "variables").mkdir()
        (staging / "variables" / "variables.index").write_bytes(os.urandom(100))
        (staging / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(1 << 20))
        t = time.perf_counter()
        version = reg.publish("m", staging, {"reason": f"bench {v}"})
        publishes.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        reg.verify("m", version)
        verifies.append((time.perf_counter() - t) * 1000)
    return {"write_batch_ms": statistics.median(writes), "poll_ms": poll, "read_batch_ms": read,
            "publish_ms": statistics.median(publishes), "verify_ms": statistics.median(verifies)}


def run() -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    load0 = os.getloadavg()[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"bench{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        options = {"key": "bench", "secret": "bench",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        with tempfile.TemporaryDirectory(prefix="bench-objstore-") as tmp_text:
            tmp = Path(tmp_text)
            local = measure(tmp / "features", tmp / "models", None, tmp)
            s3 = measure(f"s3://{bucket}/features", f"s3://{bucket}/models", options, tmp)
    finally:
        server.stop()
    return {
        "bench": "objstore", "machine": machine(), "batches": BATCHES, "versions": VERSIONS,
        "baseline": "local directory, same run",
        "figures": {"local": {k: round(v, 3) for k, v in local.items()},
                    "s3_moto": {k: round(v, 3) for k, v in s3.items()},
                    "ratio_s3_over_local": {k: round(s3[k] / local[k], 1) if local[k] else None for k in local}},
        "environment": {"loadavg_1m_start": round(load0, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    result = run()
    write_report("objstore", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
