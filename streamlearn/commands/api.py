"""`streamlearn api serve` (the control API, docs/API.md) and `streamlearn jobs list|show|cancel`.

The ``jobs`` commands read and change the same job files (``<home>/jobs``) through the same code as
the API's ``/jobs`` routes (``streamlearn.api.jobs``), so they work whether or not the API runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from streaming import config
from streamlearn.argtypes import count_arg, whole

if TYPE_CHECKING:
    from streamlearn.api.jobs import JobStore

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("api", help="the control API: /query, /trainModel, /process, /jobs over HTTP (docs/API.md)")
    asub = a.add_subparsers(dest="api_cmd", metavar="ACTION")
    asub.required = True
    s = asub.add_parser("serve", help="run the control API (binds loopback unless keys are configured)")
    s.add_argument("--host", dest="api_host", help=config.flag_help("api_host"))
    s.add_argument("--port", dest="api_port", type=int, help=config.flag_help("api_port"))
    s.add_argument("--max-jobs", dest="api_max_jobs", type=int, help=config.flag_help("api_max_jobs"))
    s.add_argument("--compact-interval", dest="api_compact_interval_s", type=float, metavar="S",
                   help=config.flag_help("api_compact_interval_s"))
    s.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    s.set_defaults(func=_serve)

    j = sub.add_parser("jobs", help="jobs of the control API under this home: list, show, cancel")
    jsub = j.add_subparsers(dest="jobs_cmd", metavar="ACTION")
    jsub.required = True
    ls = jsub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    ls.add_argument("--for-tenant", dest="job_tenant", metavar="TENANT",
                    help="only this tenant's jobs ('' = the default tenant)")
    ls.add_argument("--limit", type=count_arg, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    sh = jsub.add_parser("show", help="a job's state, progress and the end of its log")
    sh.add_argument("job_id")
    sh.add_argument("--tail-bytes", type=whole(0, 16 * 1024 * 1024), default=4096)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=_show)
    c = jsub.add_parser("cancel", help="cancel a queued or running job: SIGTERM its process group, SIGKILL after "
                                       "the grace period")
    c.add_argument("job_id")
    c.add_argument("--grace", dest="api_cancel_grace_s", type=float, metavar="S",
                   help=config.flag_help("api_cancel_grace_s"))
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cancel)


def _serve(args: argparse.Namespace, settings: config.Settings) -> int:
    from schemas.access import bind_host, load_keys
    from schemas.httpguard import server_config
    from streamlearn.api.app import create_app

    changes = {k: getattr(args, k) for k in ("api_host", "api_port", "api_max_jobs", "api_compact_interval_s")
               if getattr(args, k) is not None}
    settings = settings.with_(**changes) if changes else settings
    keys = load_keys(settings.keys, settings.keys_file)
    host, warning = bind_host(settings.api_host, keys, "control API", "--host / STREAMLEARN_API_HOST")
    if warning:
        log.warning(warning)
    import uvicorn

    from streamlearn.api.jobs import JobRunner

    runner = JobRunner(settings)
    runner.claim_home()  # a second API on this home: one error line here, not a uvicorn start-up traceback
    app = create_app(settings, keys=keys, runner=runner)
    log.info("control API on http://%s:%d (OpenAPI at /docs), %s", host, settings.api_port,
             f"{len(keys)} key(s)" if keys else "no key: loopback only")
    uvicorn.Server(server_config(app, host=host, port=settings.api_port, log_level=settings.log_level.lower(),
                                 access_log=args.access_log)).run()
    return 0


def _store(settings: config.Settings) -> JobStore:
    from streamlearn.api.jobs import JobStore, reap_orphans

    store = JobStore(settings.home / "jobs")
    reap_orphans(store, None, settings.api_cancel_grace_s, starting=False)
    return store


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _list(args: argparse.Namespace, settings: config.Settings) -> int:
    store = _store(settings)
    jobs = store.jobs(args.limit, lambda j: (args.status is None or j.status == args.status)
                      and (args.job_tenant is None or j.tenant == args.job_tenant))
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], sort_keys=True))
        return 0
    for j in jobs:
        what = j.args.get("model") or f"{j.args.get('kind')}/{j.args.get('namespace')}"
        extra = f" version {j.version}" if j.version is not None else ""
        print(f"{j.id}  {j.kind:<7} {j.status:<9} {what}  tenant={j.tenant or 'default'}  "
              f"started {_when(j.started_ms)}{extra}")
    if not jobs:
        print("no jobs")
    return 0


def _show(args: argparse.Namespace, settings: config.Settings) -> int:
    from streamlearn.api.jobs import progress

    store = _store(settings)
    job = store.load(args.job_id)
    tail = store.tail(job.id, args.tail_bytes)
    if args.json:
        print(json.dumps({"job": job.to_dict(), "progress": progress(store, job), "log_tail": tail}, sort_keys=True))
        return 0
    print(f"job {job.id}: {job.kind} {job.status} (tenant {job.tenant or 'default'})")
    print(f"  command: streamlearn {' '.join(job.argv)}")
    print(f"  started {_when(job.started_ms)}, ended {_when(job.ended_ms)}, exit code {job.exit_code}")
    if job.version is not None or job.gate:
        gate = job.gate or {}
        print(f"  version {job.version}; gate {gate.get('action', '-')}: {gate.get('reason', '-')}")
    if job.reason:
        print(f"  reason: {job.reason}")
    print(f"  log ({store.log_path(job.id)}), last {args.tail_bytes} bytes:")
    for line in tail.splitlines():
        print(f"    {line}")
    return 0


def _cancel(args: argparse.Namespace, settings: config.Settings) -> int:
    from streamlearn.api.jobs import cancel

    store = _store(settings)
    grace = args.api_cancel_grace_s if args.api_cancel_grace_s is not None else settings.api_cancel_grace_s
    job = cancel(store, args.job_id, grace, by="`streamlearn jobs cancel`")
    if args.json:
        print(json.dumps(job.to_dict(), sort_keys=True))
    else:
        print(f"job {job.id} cancelled (process group {job.pid} ended)")
    return 0
