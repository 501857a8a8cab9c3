"""The ``energy-monitor`` command line: a thin layer over the library.

Exit codes: 0 ok, 1 failure at run time, 2 usage error, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from monitor import __version__
from monitor import config as config_mod
from monitor.act.orders import Actions, ActionsError
from monitor.app import status
from monitor.app.service import Service
from monitor.config import Config, ConfigError
from monitor.outputs import events
from monitor.report import build as report
from monitor.store import audit
from monitor.store.db import StoreError, transaction
from monitor.store.ledger import Store

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
log = logging.getLogger("monitor")


def _load(args: argparse.Namespace, *, secrets: bool = True) -> Config:
    """The configuration; read-only commands pass ``secrets=False`` so they work from a
    plain shell after the service (and its systemd credentials) stopped."""
    return config_mod.load(getattr(args, "config", None), secrets=secrets)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"ok: site {cfg.site.id}, {len(cfg.sources)} sources, {len(cfg.meters)} meters, "
          f"{len(cfg.rules)} rules (config sha256 {cfg.digest[:16]})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    svc = Service(cfg)
    try:
        svc.start()
    except Exception as exc:  # noqa: BLE001 - any start failure: undo what started, exit 1
        log.error("cannot start: %s", exc)
        svc.stop()
        return EXIT_FAIL
    svc.supervise(stop)  # sd_notify READY/WATCHDOG/STATUS when run by systemd
    svc.stop()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    st = _open_store(cfg)
    try:
        doc = status.build(st, cfg, time.time())
    finally:
        st.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    t = doc["totals"]
    print(f"site {doc['site']}  period {doc['period']}  now {doc['now']}")
    print(f"  period energy {t['period_kwh']:.3f} kWh   power now {t['power_w'] / 1000:.2f} kW"
          f"   dead letters {doc['dead_letters']}")
    if doc["rules"]:
        print("rules:")
        for r in doc["rules"]:
            val = "" if r["value"] is None else f"{r['value']:.2f}"
            lim = "" if r["limit"] is None else f"{r['limit']}"
            print(f"  {r['id']:<24} {r['scope']:<18} {r['state']:<8} {val} / {lim} "
                  f"{r['unit'] or ''}")
    print("meters:")
    for m in doc["meters"]:
        pw = "-" if m["power_w"] is None else f"{m['power_w']:.0f} W"
        print(f"  {m['id']:<28} {m['group'] or '-':<10} {m['state']:<8} {pw:>10} "
              f"{m['period_kwh']:>12.3f} kWh  last {m['last_seen'] or 'never'}")
    return EXIT_OK


def _open_store(cfg: Config, *, write: bool = False) -> Store:
    """The store for a command: read-only unless it must ``write``; never migrated
    (only the daemon migrates, so a newer CLI cannot change the schema under an
    older daemon).  Raises :class:`StoreError` naming the problem."""
    reader = Store(cfg.storage.path, readonly=True)  # checks it exists, at our schema
    if not write:
        return reader
    reader.close()
    return Store(cfg.storage.path, migrate_schema=False)


def cmd_report(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    try:
        return report.run(cfg, args.period, args.format, args.out)
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_orders(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    st = _open_store(cfg, write=args.orders_cmd == "resume")
    try:
        if args.orders_cmd == "resume":
            now = time.time()
            actions = Actions(cfg, None, lambda conn, ev: events.emit(conn, cfg, ev, now))
            try:
                with transaction(st.conn):
                    order = actions.resume(st.conn, args.scope, now, actor=args.actor,
                                           reason=args.reason)
            except (ActionsError, ValueError) as exc:
                print(f"orders resume: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(f"resume order {order.order_id} for {args.scope} recorded "
                  f"({', '.join(order.meters) or 'no meters'}); the running daemon publishes it")
            return EXIT_OK
        rows = Actions.list_orders(st.conn, args.limit)
    finally:
        st.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no orders")
    for o in rows:
        print(f"{o['issued_at']}  {o['order_id']}  {o['action']:<8} {o['scope']:<18} "
              f"{o['state']:<10} rule={o['rule'] or '-'} by={o['actor']}"
              f"{' DRY-RUN' if o.get('dry_run') else ''}  meters={','.join(o['meters'])}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    st = _open_store(cfg)
    try:
        result = audit.verify(st.conn)
    finally:
        st.close()
    print(str(result), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAIL


def cmd_simulate(args: argparse.Namespace) -> int:
    return _simulate(args.sim_args)


def simulate_parser() -> argparse.ArgumentParser:
    """The parser of ``energy-monitor simulate`` (imports the simulator)."""
    # The simulator is not part of the daemon: imported only when asked for, so
    # ``run`` never loads it.  Its options are its own parser's.
    from sim import simulate  # noqa: PLC0415

    sp = argparse.ArgumentParser(prog="energy-monitor simulate",
                                 description="publish a simulated fleet of meters")
    simulate.add_arguments(sp)
    return sp


def _simulate(argv: Sequence[str]) -> int:
    from sim import simulate  # noqa: PLC0415

    try:
        sim_args = simulate_parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return simulate.run(sim_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-monitor", description=__doc__)
    p.add_argument("--version", action="version", version=f"energy-monitor {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: `orders --config X list` and `orders list --config X` both work;
        # a nested parser's default must not overwrite what its parent parsed
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="config file (default: $ENERGY_MONITOR_CONFIG, else ./config.toml)")
        return sp

    with_config(sub.add_parser("run", help="run the daemon in the foreground")).set_defaults(
        func=cmd_run)
    with_config(sub.add_parser("check-config", help="validate the configuration only")
                ).set_defaults(func=cmd_check_config)
    sp = with_config(sub.add_parser("status", help="period totals, rules, meters"))
    sp.add_argument("--json", action="store_true", help="machine-readable (SPEC status JSON)")
    sp.set_defaults(func=cmd_status)
    sp = with_config(sub.add_parser("report", help="compliance report of one calendar month"))
    sp.add_argument("--period", required=True, help="YYYY-MM, in the site's time zone")
    sp.add_argument("--format", choices=["csv", "json", "html"], default="json")
    sp.add_argument("--out", type=Path, default=None, help="write to FILE instead of stdout")
    sp.set_defaults(func=cmd_report)

    sp = with_config(sub.add_parser("orders", help="orders issued and their outcome; resume"))
    osub = sp.add_subparsers(dest="orders_cmd")
    ol = with_config(osub.add_parser("list", help="recent orders (default)"))
    ol.add_argument("--limit", type=int, default=50)
    ol.add_argument("--json", action="store_true")
    orr = with_config(osub.add_parser("resume", help="resume SCOPE (site, group:NAME, meter:ID)"))
    orr.add_argument("scope")
    orr.add_argument("--actor", default=os.environ.get("SUDO_USER") or os.environ.get(
        "USER") or "operator", help="who resumes (recorded in the audit log)")
    orr.add_argument("--reason", default="", help="why (recorded in the audit log)")
    sp.set_defaults(func=cmd_orders, orders_cmd="list", limit=50, json=False)

    sp = with_config(sub.add_parser("audit", help="the tamper-evident audit log"))
    asub = sp.add_subparsers(dest="audit_cmd", required=True)
    with_config(asub.add_parser("verify", help="verify the hash chain; exit 1 if broken"))
    sp.set_defaults(func=cmd_audit)

    sp = sub.add_parser("simulate", help="publish a simulated fleet of meters "
                        "(energy-monitor simulate --help for its options)", add_help=False)
    sp.add_argument("sim_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _simulate(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, StoreError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
