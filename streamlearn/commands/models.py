"""`streamlearn models list|show|diff|promote|rollback|check`: inspect and steer the model registry.

``promote`` and ``rollback`` change ``state.json`` first (atomically, what serving reads) and then
announce the change as a ModelUpdate event; ``--no-event`` skips the event when Kafka is not
reachable (serving also watches the registry itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from streaming import config
from streaming.exceptions import ModelRegistryError
from streaming.model_registry import ModelRegistry
from streamlearn.modelref import model_ref, versioned_ref


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, inspect, compare, promote and roll back model versions")
    ms = p.add_subparsers(dest="models_cmd", metavar="ACTION")
    ms.required = True
    ls = ms.add_parser("list", help="every model with its versions and the promoted one")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)
    show = ms.add_parser("show", help="metadata of one version (default: the promoted one) and the history")
    show.add_argument("model", type=model_ref, help="model name, or model/version (e.g. digits_cnn/3)")
    show.add_argument("--manifest", action="store_true", help="include the sha256 manifest and full lineage")
    show.set_defaults(func=_show)
    diff = ms.add_parser("diff", help="what differs between two versions (scores, data, featurizer, weights)",
                         description="Compare two versions: `models diff digits_cnn/3 digits_cnn/5`.")
    diff.add_argument("a", type=versioned_ref, metavar="MODEL/VERSION", help="first version, e.g. digits_cnn/3")
    diff.add_argument("b", metavar="MODEL/VERSION", help="second version, e.g. digits_cnn/5")
    diff.set_defaults(func=_diff)
    promote = ms.add_parser("promote", help="make a version the one serving answers with (verified first)",
                            description="Promote a version: `models promote digits_cnn/4`.")
    promote.add_argument("ref", type=versioned_ref, metavar="MODEL/VERSION", help="e.g. digits_cnn/4")
    promote.add_argument("--reason", default="manual promotion", help="recorded in the history and the event")
    promote.add_argument("--no-event", action="store_true", help="do not publish a ModelUpdate event")
    promote.set_defaults(func=_promote)
    rb = ms.add_parser("rollback", help="go back to the previously promoted version")
    rb.add_argument("model")
    rb.add_argument("--reason", default="manual rollback")
    rb.add_argument("--no-event", action="store_true", help="do not publish a ModelUpdate event")
    rb.set_defaults(func=_rollback)
    tfs = ms.add_parser("tf-serving-config",
                        help="write TF Serving's models.config: promoted (stable) and canary versions only",
                        description="TF Serving pointed at the registry would serve the newest version directory, "
                                    "gate-rejected candidates included. This config pins specific versions and "
                                    "labels them stable/canary. It is also rewritten on every promotion and "
                                    "rollback, as <model dir>/models.config.")
    tfs.add_argument("--output", "-o", help="write here instead of printing ('-' prints; default: print)")
    tfs.add_argument("--base-path", metavar="DIR",
                     help="the model directory as TF Serving sees it, e.g. /models in its container "
                          "(default: this registry's absolute path)")
    tfs.set_defaults(func=_tf_serving_config)
    check = ms.add_parser("check", help="run the shared spec checks on a model spec (trains briefly)")
    check.add_argument("model", nargs="*", help="model names (default: every known spec)")
    check.set_defaults(func=_check)


def _registry(settings: config.Settings) -> ModelRegistry:
    return ModelRegistry(settings.model_dir)


def _list(args: argparse.Namespace, settings: config.Settings) -> int:
    from trainer.spec import spec_sources

    reg = _registry(settings)
    names = sorted(set(reg.names()) | set(spec_sources(settings)))
    rows: list[dict[str, Any]] = []
    damaged = 0
    for name in names:
        versions = reg.versions(name)
        problem, promoted, score = None, None, None
        try:  # one model's damage is that model's line, not the whole listing's traceback
            promoted = reg.promoted(name)
            if promoted is not None:
                score = reg.metadata(name, promoted).get("scores", {}).get("candidate")
        except ModelRegistryError as exc:
            problem, damaged = str(exc), damaged + 1
            print(f"models list: {exc}; `streamlearn models rollback {name}` promotes the previous version",
                  file=sys.stderr)
        rows.append({"model": name, "versions": versions, "promoted": promoted, "latest": versions[-1] if versions
                     else None, "promoted_score": score, **({"problem": problem} if problem else {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 1 if damaged else 0
    print(f"{'MODEL':<22} {'PROMOTED':>8} {'LATEST':>6} {'SCORE':>10}  VERSIONS")
    for r in rows:
        score = "-" if r["promoted_score"] is None else f"{r['promoted_score']:.4g}"
        print(f"{r['model']:<22} {r['promoted'] if r['promoted'] is not None else '-':>8} "
              f"{r['latest'] if r['latest'] is not None else '-':>6} {score:>10}  "
              f"{','.join(map(str, r['versions'])) or '-'}{'  (damaged: see above)' if r.get('problem') else ''}")
    return 1 if damaged else 0


def _show(args: argparse.Namespace, settings: config.Settings) -> int:
    reg = _registry(settings)
    name, version = args.model
    if version is None:
        version = reg.promoted(name) or reg.latest(name)
    if version is None:
        print(f"error: model: {name!r} has no versions in {settings.model_dir}; train it with "
              f"`streamlearn train {name} --once`", file=sys.stderr)
        return 1
    meta = reg.metadata(name, version)
    if not args.manifest:
        meta.pop("manifest", None)
        lineage = meta.get("lineage", {})
        lineage["batches"] = [f"{b['role']}: {b['batch_id']} sha256={b['sha256'][:12]}"
                              for b in lineage.get("batches", [])]
        meta.get("training", {}).pop("history", None)
    try:
        reg.verify(name, version)
        meta["integrity"] = "ok"
    except Exception as exc:
        meta["integrity"] = str(exc)
    meta["promoted"] = reg.promoted(name) == version
    meta["history"] = [e for e in reg.history(name) if e.get("version") == version]
    meta["summary"] = score_summary(meta)
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, int | float) else "-"


def score_summary(meta: dict[str, Any]) -> str:
    """One line: metric and its direction, the rows, candidate / current / baseline scores, decision."""
    sc = meta.get("scores") or {}
    gate = meta.get("gate") or {}
    better = sc.get("better") or ("lower" if sc.get("direction") == "min" else "higher")
    return (f"{sc.get('metric', '?')} ({better} is better) on {sc.get('eval_rows', '?')} held-out rows "
            f"({sc.get('holdout_batches', '?')} batches; trained on {sc.get('train_rows', '?')} rows): "
            f"candidate {_fmt(sc.get('candidate'))}, current {_fmt(sc.get('current'))}, "
            f"baseline {sc.get('baseline_name') or '-'} {_fmt(sc.get('baseline'))} -> {gate.get('action', '?')}")


def _weights_distance(reg: ModelRegistry, name: str, a: int, b: int) -> float | None:
    import numpy as np

    from trainer.model_io import WEIGHTS_FILE

    try:
        path_a = reg.version_dir(name, a) / WEIGHTS_FILE
        path_b = reg.version_dir(name, b) / WEIGHTS_FILE
        with np.load(path_a) as da, np.load(path_b) as db:
            if sorted(da.files) != sorted(db.files) or any(da[k].shape != db[k].shape for k in da.files):
                return None
            return float(np.sqrt(sum(float(np.sum((da[k] - db[k]) ** 2)) for k in da.files)))
    except OSError:
        return None


def _diff(args: argparse.Namespace, settings: config.Settings) -> int:
    reg = _registry(settings)
    model, a = args.a
    b_text = str(args.b)
    try:  # the second may be a bare version number of the same model: `diff digits_cnn/3 5`
        b = int(b_text) if b_text.isdigit() else versioned_ref(b_text).version
        b_model = model if b_text.isdigit() else versioned_ref(b_text).model
    except argparse.ArgumentTypeError as exc:
        print(f"error: models diff: second version {exc}", file=sys.stderr)
        return 2
    if b_model != model:
        print(f"error: models diff: both versions must be of one model, got {args.a} and {b_text}", file=sys.stderr)
        return 2
    assert a is not None and b is not None
    ma, mb = reg.metadata(model, a), reg.metadata(model, b)
    out: dict[str, Any] = {"model": model, "a": a, "b": b}
    for key in ("parent_version", "created_at", "featurizer", "schema_ids", "tf_version", "seed", "warm_started",
                "trigger", "spec"):
        if ma.get(key) != mb.get(key):
            out[key] = {"a": ma.get(key), "b": mb.get(key)}
    out["scores"] = {"a": ma.get("scores"), "b": mb.get("scores")}
    out["gate"] = {"a": (ma.get("gate") or {}).get("reason"), "b": (mb.get("gate") or {}).get("reason")}
    ba = {x["batch_id"]: x["role"] for x in ma.get("lineage", {}).get("batches", [])}
    bb = {x["batch_id"]: x["role"] for x in mb.get("lineage", {}).get("batches", [])}
    out["batches"] = {"only_a": sorted(set(ba) - set(bb)), "only_b": sorted(set(bb) - set(ba)),
                      "role_changed": sorted(k for k in set(ba) & set(bb) if ba[k] != bb[k])}
    out["training_rows"] = {"a": ma.get("training", {}).get("rows"), "b": mb.get("training", {}).get("rows")}
    out["weights_l2_distance"] = _weights_distance(reg, model, a, b)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _announce(settings: config.Settings, name: str, version: int, action: str, reason: str, skip: bool) -> None:
    if skip:
        return
    from trainer.events import publish_update, update_record

    reg = _registry(settings)
    meta = reg.metadata(name, version)
    record = update_record(name, version, action, reg.version_dir(name, version), reason=reason,
                           primary_metric=meta.get("primary_metric"),
                           candidate_score=(meta.get("scores") or {}).get("candidate"))
    publish_update(settings, record)


def _promote(args: argparse.Namespace, settings: config.Settings) -> int:
    reg = _registry(settings)
    model, version = args.ref
    previous = reg.set_promoted(model, version, args.reason)
    print(f"{model}: promoted version {version} (was {previous})")
    _announce(settings, model, version, "PROMOTED", args.reason, args.no_event)
    return 0


def _rollback(args: argparse.Namespace, settings: config.Settings) -> int:
    reg = _registry(settings)
    current = reg.promoted(args.model)
    target = reg.rollback(args.model, args.reason)
    print(f"{args.model}: rolled back from version {current} to {target}")
    _announce(settings, args.model, target, "ROLLED_BACK", args.reason, args.no_event)
    return 0


def _tf_serving_config(args: argparse.Namespace, settings: config.Settings) -> int:
    from pathlib import Path

    from streaming.tf_serving import CONFIG_FILE, render_config, write_config

    reg = _registry(settings)
    if args.output in (None, "-"):
        print(render_config(reg, base_path=args.base_path), end="")
        return 0
    target = Path(args.output)
    if target.is_dir():  # like cp: a directory gets the file under its usual name
        target = target / CONFIG_FILE
    try:
        path = write_config(reg, target, base_path=args.base_path)
    except OSError as exc:
        print(f"error: --output: cannot write {target}: {exc.strerror or exc}; name a writable file, "
              "or '-' to print", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace, settings: config.Settings) -> int:
    from trainer.checks import check_spec
    from trainer.exceptions import SpecCheckError
    from trainer.spec import load_spec, spec_sources

    names = args.model or sorted(spec_sources(settings))
    failed = 0
    for name in names:  # one bad plugin is that model's FAILED line; the others are still checked
        try:
            check_spec(load_spec(name, settings))
            print(f"{name}: ok")
        except SpecCheckError as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}")
        except Exception as exc:  # noqa: BLE001 - a plugin's build/loss/score raising: was a traceback, and the end
            failed += 1
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    return 1 if failed else 0
