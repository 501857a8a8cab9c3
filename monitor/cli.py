"""The ``energy-monitor`` command line: a thin layer over the library.

Exit codes: 0 ok, 1 failure at run time, 2 usage error, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from monitor import __version__
from monitor import config as config_mod
from monitor.config import Config, ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
log = logging.getLogger("monitor")


def _load(args: argparse.Namespace) -> Config:
    return config_mod.load(args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"ok: site {cfg.site.id}, {len(cfg.sources)} sources, {len(cfg.meters)} meters, "
          f"{len(cfg.rules)} rules (config sha256 {cfg.digest[:16]})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.service import Service

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
    except Exception as exc:
        log.error("cannot start: %s", exc)
        svc.stop()
        return EXIT_FAIL
    while not stop.wait(1.0):
        pass
    svc.stop()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from monitor import status
    from monitor.store import Store

    cfg = _load(args)
    if not Path(cfg.storage.path).exists():
        print(f"no store at {cfg.storage.path}: has the daemon run yet?", file=sys.stderr)
        return EXIT_FAIL
    st = Store(cfg.storage.path)
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from monitor import simulate

    return simulate.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-monitor", description=__doc__)
    p.add_argument("--version", action="version", version=f"energy-monitor {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", type=Path, default=None,
                        help="config file (default: $ENERGY_MONITOR_CONFIG, else ./config.toml)")
        return sp

    with_config(sub.add_parser("run", help="run the daemon in the foreground")).set_defaults(
        func=cmd_run)
    with_config(sub.add_parser("check-config", help="validate the configuration only")
                ).set_defaults(func=cmd_check_config)
    sp = with_config(sub.add_parser("status", help="period totals, rules, meters"))
    sp.add_argument("--json", action="store_true", help="machine-readable (SPEC status JSON)")
    sp.set_defaults(func=cmd_status)
    from monitor import simulate

    sp = sub.add_parser("simulate", help="publish a simulated fleet of meters")
    simulate.add_arguments(sp)
    sp.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        return EXIT_FAIL
