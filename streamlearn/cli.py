"""`streamlearn`: one command for the platform.

Each module in ``streamlearn/commands/`` that defines ``register(subparsers)`` contributes its
subcommands, so packages add commands without editing this file. Handlers receive
``(args, settings)`` and return an exit code; heavy imports (TensorFlow) happen inside handlers
so that ``streamlearn --help`` stays fast.

Global flags fall back to environment variables (named in ``--help``) and the config file; see
``streaming.config``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from schemas.exceptions import StreamlearnError
from streaming import config, progress
from streaming.logs import setup_logging

log = logging.getLogger("streamlearn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlearn",
        description="Streaming ingestion and online learning on Kafka: publish events, featurize and "
                    "micro-batch them, retrain TensorFlow models, serve them with hot swaps.",
        epilog="Settings: every flag falls back to the STREAMLEARN_* variable named in its help, then to "
               "the config file ($STREAMLEARN_CONFIG, $STREAMLEARN_HOME/config.toml or ./streamlearn.toml). "
               "Kafka credentials (env or config file only, never argv): "
               + ", ".join(s.env for s in config.SPECS if s.name.startswith("kafka_s"))
               + " (docs/SECURITY.md).",
    )
    parser.add_argument("--config", help="config file (TOML; the only place besides $STREAMLEARN_HOME/config.toml "
                                         "whose [models] plugins are loaded) (env STREAMLEARN_CONFIG)")
    parser.add_argument("--home", help=config.flag_help("home"))
    parser.add_argument("--bootstrap", dest="kafka_bootstrap",
                        help=config.flag_help("kafka_bootstrap"))
    parser.add_argument("--registry-url", help=config.flag_help("registry_url"))
    parser.add_argument("--topic-prefix", help=config.flag_help("topic_prefix"))
    parser.add_argument("--tenant", help=config.flag_help("tenant"))
    parser.add_argument("--log-level", help=config.flag_help("log_level"))
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or progress lines; log only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and TensorFlow's/absl's own start-up messages (hidden otherwise)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import streamlearn.commands as commands_pkg

    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        try:
            module = importlib.import_module(f"streamlearn.commands.{info.name}")
        except ImportError as exc:  # one broken command must not take the others down; tests catch it
            print(f"warning: command module {info.name!r} failed to import: {exc}", file=sys.stderr)
            continue
        register = getattr(module, "register", None)
        if callable(register):
            register(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> config.Settings:
    if getattr(args, "config", None):  # exported so the processes this command starts read it too
        os.environ["STREAMLEARN_CONFIG"] = str(args.config)
    keys = ("home", "kafka_bootstrap", "registry_url", "topic_prefix", "tenant", "log_level", "broker_port",
            "registry_port", "ingest_port", "metrics_port")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    settings = config.load(overrides)
    if "broker_port" not in overrides:
        from streaming.broker import resolve

        settings = resolve(settings)
    return settings


#: Commands that can do nothing before a Kafka broker answers: they fail at once when the embedded broker
#: was never started (:func:`streaming.broker.not_started`), instead of after a 30 s bootstrap timeout.
#: Not here: commands that start the broker themselves (``broker``, ``up``, ``demo``), work without one
#: (``schemas``, ``models``, ``store``, ``train``, ``query``, ``status``), or serve HTTP while it is away
#: (``api``, ``registry``, ``ingest serve``).
NEEDS_BROKER = frozenset({"topics", "publish", "subscribe", "replay", "offsets", "stream", "serve", "predict",
                          "ingest"})


def _needs_broker(args: argparse.Namespace) -> bool:
    return args.command in NEEDS_BROKER and getattr(args, "ingest_command", None) != "serve"


def main(argv: Sequence[str] | None = None) -> int:
    from streaming.timeargs import attach_relative_values

    parser = build_parser()
    args = parser.parse_args(attach_relative_values(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_from_args(args)
    except StreamlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    quiet, verbose = bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False))
    setup_logging(settings.log_level, quiet=quiet, verbose=verbose)
    progress.configure(quiet=quiet)
    if _needs_broker(args):
        from streaming.broker import not_started

        if (reason := not_started(settings)) is not None:
            print(f"error: {reason}", file=sys.stderr)
            return 1
    try:
        code = int(args.func(args, settings) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except StreamlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:
        from streamlearn.broker_errors import unreachable_message

        message = unreachable_message(exc, settings)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


def _closed_pipe() -> int:
    """The reader of our stdout went away (``... | head``): stop quietly, as Unix tools do.

    Python would print a traceback, then another one while flushing stdout at exit; pointing
    stdout at /dev/null first makes that last flush harmless.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError):
        os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
