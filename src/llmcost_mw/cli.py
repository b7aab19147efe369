"""The `llmcost` command: demo, report, watch, prices and exporter.

Environment variables are read here and nowhere else in the package:
LLMCOST_DATABASE_URL (default sqlite:///costs.db), LLMCOST_NTFY_URL,
LLMCOST_NTFY_TOKEN and LLMCOST_POLL_SECONDS.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from .errors import ConfigurationError, LLMCostError
from .store import DEFAULT_DATABASE_URL, Store, _redact

__all__ = ["main"]

logger = logging.getLogger("llmcost_mw.cli")

EXIT_CONFIG_ERROR = 2


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get("LLMCOST_DATABASE_URL") or DEFAULT_DATABASE_URL
    # An in-memory SQLite store is empty in every new process, so a command
    # given one would read or watch nothing and still succeed.
    if re.fullmatch(r"sqlite(\+\w+)?://(/(:memory:)?)?", url.strip()):
        raise ConfigurationError(
            f"the database URL {url!r} names an in-memory SQLite store, which no other process can see; "
            "give the file your app writes to, e.g. sqlite:///costs.db"
        )
    return url


def _safe_database_url(args: argparse.Namespace) -> str:
    url = getattr(args, "database_url", None) or os.environ.get("LLMCOST_DATABASE_URL") or DEFAULT_DATABASE_URL
    return _redact(url)


def _add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help=f"store URL (default: $LLMCOST_DATABASE_URL, else {DEFAULT_DATABASE_URL})",
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, format_report

    if args.top < 1:
        raise ConfigurationError(f"invalid --top {args.top}: give the number of users to list, 1 or more")
    store = Store(_database_url(args))
    sys.stdout.write(format_report(build_report(store, top_users=args.top)))
    return 0


def _cmd_prices(args: argparse.Namespace) -> int:
    from .price_listing import compare_with_genai_prices, format_price_table
    from .pricing import PriceBook

    book = PriceBook.load(args.file)
    if args.compare:
        text, differences = compare_with_genai_prices(book)
        sys.stdout.write(text)
        return 1 if differences else 0
    sys.stdout.write(format_price_table(book))
    return 0


def _poll_seconds(args: argparse.Namespace) -> float:
    raw = args.interval if args.interval is not None else os.environ.get("LLMCOST_POLL_SECONDS", "60")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigurationError(
            f"invalid poll interval {raw!r}: give a number of seconds, e.g. --interval 60"
        ) from None
    if seconds <= 0:
        raise ConfigurationError(f"invalid poll interval {raw!r}: it must be above 0 seconds")
    return seconds


def _cmd_watch(args: argparse.Namespace) -> int:
    from .alerts import NtfyNotifier, Watcher, builtin_rules, load_rules

    interval = _poll_seconds(args)
    store = Store(_database_url(args))
    # Rules from a file are checked against the store they will run on, so
    # SQL that only PostgreSQL understands is accepted there.
    rules = load_rules(args.rules, store=store) if args.rules else builtin_rules()
    ntfy_url = os.environ.get("LLMCOST_NTFY_URL")
    notifier = None
    if ntfy_url:
        notifier = NtfyNotifier(ntfy_url, token=os.environ.get("LLMCOST_NTFY_TOKEN") or None)
    elif not args.dry_run:
        raise ConfigurationError(
            "LLMCOST_NTFY_URL is not set: set it to your ntfy topic URL (e.g. https://ntfy.sh/<topic>), "
            "or pass --dry-run to print alerts instead of sending them"
        )
    watcher = Watcher(store, rules, notifier, interval_seconds=interval, dry_run=args.dry_run)
    if args.once:
        watcher.run_once()
        return 0

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    watcher.run_forever(stop)
    return 0


def _cmd_exporter(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .exporter import StoreCollector, serve_exporter

    if not 0 <= args.port <= 65535:
        raise ConfigurationError(
            f"invalid port {args.port}: give a TCP port from 1 to 65535, or 0 for any free port"
        )
    store = Store(_database_url(args))
    collector = StoreCollector(store, max_features=args.max_features, max_models=args.max_models)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        serve_exporter(store, host=args.host, port=args.port, stop=stop, collector=collector)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    except SQLAlchemyError as exc:
        raise LLMCostError(f"reading the store {store.safe_url} failed: {exc}") from exc
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .retention import prune

    result = prune(Store(_database_url(args)), older_than_days=args.older_than)
    print(
        f"deleted {result.rows_deleted} rows from {result.days} days before {result.cutoff:%Y-%m-%d}; "
        "their daily totals stay in cost_daily"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(database_path=args.database, app=args.app, keep=args.keep, server=args.server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcost", description="Cost of LLM calls per feature, user and request."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the example app offline against a local fake API and print alerts and the report"
    )
    demo.add_argument(
        "--database", default="llmcost-demo.db", help="SQLite file for the demo, recreated on each run"
    )
    demo.add_argument(
        "--app", default="examples.fastapi_app.app:app", help="ASGI or WSGI app to serve, as module:attribute"
    )
    demo.add_argument(
        "--server",
        choices=("uvicorn", "gunicorn"),
        help="server for the app: uvicorn for ASGI apps, gunicorn (1 worker, 4 threads) for WSGI apps "
        "(default: gunicorn for apps in examples.flask_app, uvicorn otherwise)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the rows of earlier demo runs")
    demo.set_defaults(handler=_cmd_demo)

    report = commands.add_parser("report", help="print cost per feature, top users and daily cost")
    _add_database_option(report)
    report.add_argument("--top", type=int, default=20, help="number of users in the top-users table")
    report.set_defaults(handler=_cmd_report)

    watch = commands.add_parser("watch", help="run the alert rules and page through ntfy")
    _add_database_option(watch)
    watch.add_argument("--once", action="store_true", help="run one pass and exit")
    watch.add_argument(
        "--interval", help="seconds between passes (default: $LLMCOST_POLL_SECONDS, else 60)"
    )
    watch.add_argument("--rules", help="TOML file that adds rules or overrides thresholds")
    watch.add_argument("--dry-run", action="store_true", help="print alerts instead of sending them")
    watch.set_defaults(handler=_cmd_watch)

    prune = commands.add_parser(
        "prune", help="roll old rows up into daily totals per feature, user and model, then delete them"
    )
    _add_database_option(prune)
    prune.add_argument(
        "--older-than", type=int, required=True, metavar="DAYS",
        help="prune the UTC days that ended more than DAYS days ago",
    )
    prune.set_defaults(handler=_cmd_prune)

    prices = commands.add_parser("prices", help="list the price table with each row's source and check date")
    prices.add_argument("--file", help="price table TOML file (default: the bundled table)")
    prices.add_argument(
        "--compare", action="store_true", help="list models whose prices differ from genai-prices"
    )
    prices.set_defaults(handler=_cmd_prices)

    exporter = commands.add_parser(
        "exporter", help="serve Prometheus metrics computed from the store, for any process layout"
    )
    _add_database_option(exporter)
    exporter.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    exporter.add_argument("--port", type=int, default=9466, help="TCP port to listen on (default: 9466)")
    exporter.add_argument(
        "--max-features", type=int, default=100,
        help="distinct feature label values before new ones are counted as 'other' (default: 100)",
    )
    exporter.add_argument(
        "--max-models", type=int, default=100,
        help="distinct model label values before new ones are counted as 'other' (default: 100)",
    )
    exporter.set_defaults(handler=_cmd_exporter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except ConfigurationError as exc:
        print(f"llmcost: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except LLMCostError as exc:
        print(f"llmcost: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        # The driver's own message, without the statement and its parameters.
        reason = getattr(exc, "orig", None) or exc
        print(
            f"llmcost: error: the store at {_safe_database_url(args)} failed: {str(reason).strip()}; "
            "check LLMCOST_DATABASE_URL or --database-url, and that the database is reachable",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
