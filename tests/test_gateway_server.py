"""The gateway under a real uvicorn server: chunked bodies, concurrent duplicates, the CLI parser."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator

import httpx

from ingest.gateway.cli import BackgroundServer, limits_from_args, register_serve
from ingest.gateway.limits import GatewayLimits
from ingest.gateway.routes import create_app
from streaming import config
from streaming.config import Settings
from tests.test_gateway_http import AUTH, gateway_settings, raw_records, weblog


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def test_chunked_body_without_content_length_over_the_limit_is_413(settings: Settings) -> None:
    app = create_app(gateway_settings(settings), limits=GatewayLimits(max_body_bytes=4096))
    body = json.dumps([weblog(i) for i in range(3)]).encode()
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        big = http.post("/ingest/weblog", content=_chunks(64 * 1024),
                        headers={**AUTH, "Content-Type": "application/json"})
        small = http.post("/ingest/weblog", content=iter([body[:100], body[100:]]),
                          headers={**AUTH, "Content-Type": "application/json"})
        metrics = http.get("/metrics").text
    assert "content-length" not in {k.lower() for k in big.request.headers}
    assert big.request.headers["transfer-encoding"] == "chunked"
    assert big.status_code == 413 and "4096 bytes" in big.json()["error"]
    assert small.status_code == 200, small.text
    assert 'route="/ingest/{kind}",status="413"' in metrics
    assert len(raw_records(settings, "weblog", expect=3)) == 3


def test_concurrent_posts_of_the_same_event_publish_it_once(settings: Settings) -> None:
    app = create_app(gateway_settings(settings))

    async def post_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            return await asyncio.gather(*[
                http.post("/ingest/weblog", json=[weblog(1), weblog(2 + i)], headers=AUTH) for i in range(8)])

    with BackgroundServer(app) as server:
        responses = asyncio.run(post_all(server.url))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    firsts = [r.json()["results"][0] for r in responses]
    assert sorted(f["status"] for f in firsts) == ["accepted"] + ["duplicate"] * 7
    assert len({(f["partition"], f["offset"]) for f in firsts}) == 1
    records = raw_records(settings, "weblog", expect=9)
    assert sorted(r.value["event_id"] for r in records) == sorted(f"w-{i}" for i in range(1, 10))


def test_serve_subcommand_parses_port_and_limits() -> None:
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["serve", "--port", "9999", "--rate", "5", "--max-in-flight", "7",
                              "--idempotency-seed-minutes", "30"])
    assert args.ingest_port == 9999 and args.func.__name__ == "serve" and args.idempotency_seed_minutes == 30
    limits = limits_from_args(args, config.load(environ={"STREAMLEARN_INGEST_BURST": "123"}))
    assert (limits.rate_records_per_s, limits.max_in_flight) == (5.0, 7)  # flags win
    assert limits.burst_records == 123.0  # no flag: the env var
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "STREAMLEARN_INGEST_PORT" in help_text and "STREAMLEARN_INGEST_RATE" in help_text


def test_cli_serve_end_to_end_and_the_token_never_reaches_its_logs(settings: Settings) -> None:
    import subprocess

    from streaming.broker import free_port
    from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
    from tests.test_gateway_http import TOKEN

    no_tokens = subprocess.run(streamlearn_cmd("ingest", "serve"), env=subprocess_env(settings), timeout=60,
                               capture_output=True, text=True)
    assert no_tokens.returncode != 0 and "STREAMLEARN_INGEST_TOKENS" in no_tokens.stderr

    port = free_port()
    env = subprocess_env(gateway_settings(settings), STREAMLEARN_LOG_LEVEL="DEBUG")
    proc = subprocess.Popen(streamlearn_cmd("ingest", "serve", "--port", str(port), "--access-log"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=60, message="gateway subprocess healthy")
        ok = httpx.post(f"{url}/ingest/weblog", json=weblog(1), headers=AUTH, timeout=20)
        bad = httpx.post(f"{url}/ingest/weblog", json={"x": 1}, headers=AUTH, timeout=20)
        forbidden = httpx.post(f"{url}/ingest/weblog", json=weblog(2), timeout=20,
                               headers={"Authorization": f"Bearer x{TOKEN}"})
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert ok.status_code == 200 and bad.status_code == 422 and forbidden.status_code == 403, output[-3000:]
    assert "POST /ingest/weblog" in output  # the access log ran
    assert "dead letter" in output  # the rejected record was logged (by the publisher), without the token
    assert TOKEN not in output
    assert len(raw_records(settings, "weblog", expect=1)) == 1


def test_concurrent_requests_with_one_idempotency_key_run_once(settings: Settings) -> None:
    from tests.test_gateway_http import dead_letters

    app = create_app(gateway_settings(settings))
    body = [weblog(1), {"not": "an event"}]

    async def post_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            return await asyncio.gather(*[
                http.post("/ingest/weblog", json=body, headers={**AUTH, "Idempotency-Key": "k-1"})
                for _ in range(6)])

    with BackgroundServer(app) as server:
        responses = asyncio.run(post_all(server.url))
    assert {r.status_code for r in responses} == {207}
    assert all(r.json() == responses[0].json() for r in responses)
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 5
    assert len(raw_records(settings, "weblog", expect=1)) == 1
    assert len(dead_letters(settings, "weblog")) == 1  # the request's work (incl. its dead letter) ran once
