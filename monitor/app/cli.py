"""The ``energy-monitor`` command line: a thin layer over the library.

Exit codes: 0 ok, 1 failure at run time, 2 usage error, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from monitor import __version__
from monitor import config as config_mod
from monitor.act.orders import Actions, ActionsError
from monitor.app import inventory, logsetup, status
from monitor.app.service import Service
from monitor.config import Config, ConfigError
from monitor.core.timefmt import rfc3339_or_none
from monitor.outputs import events, webhooks
from monitor.report import write as report
from monitor.rules.evaluate import AnyRule, applies
from monitor.store import audit, kv
from monitor.store.db import StoreError, transaction
from monitor.store.ledger import Store

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
log = logging.getLogger("monitor")
#: kv key of the last check's time (written by monitor.rules.check)
LAST_CHECK_KEY = "check.last"


def _load(args: argparse.Namespace, *, secrets: bool = True) -> Config:
    """The configuration; read-only commands pass ``secrets=False`` so they work from a
    plain shell after the service (and its systemd credentials) stopped."""
    return config_mod.load(getattr(args, "config", None), secrets=secrets)


# --------------------------------------------------------------------------- check-config


def why_not(rule: AnyRule, cfg: Config, day: dt.date) -> str:
    """Why ``rule`` does not govern the site on ``day``, in words ('' when it does).

    Whether it applies is :func:`monitor.rules.evaluate.applies` (the daemon's own
    decision); this only says which of the rule's filters the site fails."""
    if applies(rule, cfg.site, day):
        return ""
    site = cfg.site
    reasons: list[str] = []

    def listed(items: Sequence[str]) -> str:
        if len(items) <= 4:
            return " or ".join(items)
        return f"one of {len(items)} ({', '.join(items[:3])}, ...)"

    if rule.categories and site.category.casefold() not in {
            c.casefold() for c in rule.categories}:
        reasons.append(f"it is for {listed(rule.categories)}; the site's category is "
                       f"{site.category!r}")
    if rule.regions and not any(
            site.region.upper() == r.upper() or (
                "-" not in r and site.region.upper().startswith(r.upper() + "-"))
            for r in rule.regions):
        reasons.append(f"it is for region {listed(rule.regions)}; the site is in "
                       + (repr(site.region) if site.region else "no region (site.region unset)"))
    sub = site.subregion.casefold()
    if rule.subregions and sub not in {s.casefold() for s in rule.subregions} and not reasons:
        reasons.append(f"it is for subregion {listed(rule.subregions)}; the site's "
                       "subregion is " + (repr(site.subregion) if sub else "unset"))
    if sub and sub in {s.casefold() for s in rule.exclude_subregions}:
        reasons.append(f"it exempts subregion {site.subregion!r}, where the site is")
    if getattr(rule, "exempt_off_grid", False) and site.off_grid:
        reasons.append("it exempts off-grid sites, and site.off_grid is true")
    if rule.effective_from is not None and day < rule.effective_from:
        reasons.append(f"it takes effect on {rule.effective_from.isoformat()}")
    if rule.effective_until is not None and day > rule.effective_until:
        reasons.append(f"it ended on {rule.effective_until.isoformat()}")
    return "; ".join(reasons) or "the site does not match its filters"


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    patterns = f" (+{len(cfg.meter_patterns)} meter patterns)" if cfg.meter_patterns else ""
    print(f"ok: site {cfg.site.id}, {len(cfg.sources)} sources, {len(cfg.meters)} meters"
          f"{patterns}, {len(cfg.rules)} rules (config sha256 {cfg.digest[:16]})")
    today = dt.datetime.now(cfg.site.tz).date()
    verdicts = [(r, why_not(r, cfg, today)) for r in cfg.rules]
    apply = [r for r, why in verdicts if not why]
    print(f"{len(apply)} of {len(cfg.rules)} rules apply to this site today ({today}):")
    for r in apply:
        print(f"  {r.id:<28} {r.kind:<12} {getattr(r, 'scope', '') or ''}")
    others = [(r, why) for r, why in verdicts if why]
    if others:
        print(f"{len(others)} do not:")
        for r, why in others:
            print(f"  {r.id:<28} {why}")
    return EXIT_OK


# --------------------------------------------------------------------------- run, status


def run_lock_path(cfg: Config) -> Path:
    """The file the running daemon holds an exclusive lock on (beside the store)."""
    return cfg.storage.path.with_name(cfg.storage.path.name + ".lock")


def _take_run_lock(cfg: Config) -> IO[bytes] | None:
    """Lock :func:`run_lock_path` for this process's life.  Raises ``BlockingIOError``
    when another daemon holds it; None when the file cannot be made (logged)."""
    path = run_lock_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("ab")
    except OSError as exc:
        log.warning("cannot create %s (%s): `status` cannot tell whether the daemon runs",
                    path, exc.strerror)
        return None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise
    return fh


def daemon_running(cfg: Config) -> bool | None:
    """Whether a daemon holds the store's run lock (None: cannot tell)."""
    try:
        with run_lock_path(cfg).open("rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
    except OSError:
        return None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        lock = _take_run_lock(cfg)
    except BlockingIOError:
        log.error("another daemon is running on store %s (it holds %s); not starting",
                  cfg.storage.path, run_lock_path(cfg))
        return EXIT_FAIL
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    svc = Service(cfg)
    try:
        try:
            svc.start()
        except Exception as exc:  # noqa: BLE001 - any start failure: undo what started, exit 1
            log.error("cannot start: %s", exc)
            svc.stop()
            return EXIT_FAIL
        failed = svc.supervise(stop)  # sd_notify READY/WATCHDOG/STATUS under systemd
        svc.stop()
        return EXIT_FAIL if failed else EXIT_OK  # failed: a dead intake thread
    finally:
        if lock is not None:
            lock.close()


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} days ago"


def daemon_state(st: Store, cfg: Config, now: float) -> dict[str, Any]:
    """``running`` (bool, or None when unknown) and ``last_check`` (RFC 3339 or None)."""
    raw = kv.get(st.conn, LAST_CHECK_KEY)
    last = float(raw) if raw else None
    return {"running": daemon_running(cfg), "last_check": rfc3339_or_none(last),
            "last_check_age_s": None if last is None else round(now - last, 1)}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    st = _open_store(cfg)
    try:
        now = time.time()
        doc = status.build(st, cfg, now)
        daemon = daemon_state(st, cfg, now)
    finally:
        st.close()
    if args.json:
        print(json.dumps({**doc, "daemon": daemon}, indent=2))
        return EXIT_OK
    t = doc["totals"]
    print(f"site {doc['site']}  period {doc['period']}  now {doc['now']}")
    age = daemon["last_check_age_s"]
    as_of = (f"last check {daemon['last_check']} ({_ago(age)})" if age is not None
             else "no check recorded yet")
    if daemon["running"] is False:
        print(f"  DAEMON NOT RUNNING: the figures are as of the {as_of}; meter states and "
              "power are not current")
    elif daemon["running"] is None:
        print(f"  daemon: unknown (cannot read {run_lock_path(cfg)}); {as_of}")
    else:
        stale = age is not None and age > 3 * cfg.schedule.check_interval_s
        print(f"  daemon running, {as_of}" + ("  (CHECKS ARE LATE)" if stale else ""))
    power = "power now" if daemon["running"] else "power at last reading"
    print(f"  period energy {t['period_kwh']:.3f} kWh   {power} {t['power_w'] / 1000:.2f} kW"
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
        return report.run(cfg, args.period, args.format, args.out, lang=args.lang)
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _actions(cfg: Config, now: float) -> Actions:
    return Actions(cfg, None, lambda conn, ev: events.emit(conn, cfg, ev, now))


def breaches_covering(conn: Any, actions: Actions, scope: str) -> list[tuple[str, str]]:
    """(rule, scope) of every rule in breach (the alert state) whose scope shares a
    meter with ``scope``."""
    wanted = set(actions.resolve(scope, conn))
    out = []
    for rule, rscope in conn.execute(
            "SELECT rule, scope FROM alert_state WHERE state = 'breach' ORDER BY rule, scope"):
        try:
            covered = set(actions.resolve(str(rscope), conn))
        except ActionsError:
            covered = set()
        if rscope == "site" or scope == "site" or covered & wanted:
            out.append((str(rule), str(rscope)))
    return out


def _confirm(question: str, ask: Callable[[str], str] | None = None) -> bool:
    """A yes/no answer from the terminal; never yes without one (stdin not a terminal)."""
    if ask is None:
        if not sys.stdin.isatty():
            return False
        ask = input
    try:
        return ask(question).strip().casefold() in {"y", "yes"}
    except EOFError:
        return False


def _order_resume(args: argparse.Namespace, cfg: Config, st: Store) -> int:
    now = time.time()
    actions = _actions(cfg, now)
    try:
        breaches = breaches_covering(st.conn, actions, args.scope)
    except ActionsError as exc:
        print(f"orders resume: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if breaches and not args.force:
        listed = ", ".join(f"{r} ({s})" for r, s in breaches)
        print(f"orders resume: still in breach: {listed}", file=sys.stderr)
        if not _confirm(f"Resume {args.scope} although the rule is still in breach? [y/N] "):
            print("not resumed (answer y at the prompt, or give --force)", file=sys.stderr)
            return EXIT_FAIL
    try:
        with transaction(st.conn):
            order = actions.resume(st.conn, args.scope, now, actor=args.actor,
                                   reason=args.reason)
    except (ActionsError, ValueError) as exc:
        print(f"orders resume: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"resume order {order.order_id} for {args.scope} recorded "
          f"({', '.join(order.meters) or 'no meters'}); {_who_publishes(cfg)}")
    return EXIT_OK


def _who_publishes(cfg: Config) -> str:
    if cfg.actions.mode == "dry_run":
        return "actions.mode is dry_run: recorded only, nothing is published"
    if daemon_running(cfg) is False:
        return "the daemon is NOT running: it publishes the order when it starts"
    return "the running daemon publishes it"


def _order_shutdown(args: argparse.Namespace, cfg: Config, st: Store) -> int:
    now = time.time()
    actions = _actions(cfg, now)
    reason = args.reason or f"manual shutdown by {args.actor}"
    try:
        with transaction(st.conn):
            order = actions.order(st.conn, "shutdown", args.scope, "", reason, now,
                                  actor=args.actor)
    except (ActionsError, ValueError) as exc:
        print(f"orders shutdown: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if order is None:
        print(f"every meter of {args.scope} is already under a shutdown order in force; "
              "nothing recorded")
        return EXIT_OK
    print(f"shutdown order {order.order_id} for {args.scope} recorded "
          f"({', '.join(order.meters) or 'no meters'}); {_who_publishes(cfg)}; "
          f"undo with: energy-monitor orders resume {args.scope}")
    return EXIT_OK


def cmd_orders(args: argparse.Namespace) -> int:
    cfg = _load(args, secrets=False)
    writes = args.orders_cmd in ("resume", "shutdown")
    st = _open_store(cfg, write=writes)
    try:
        if args.orders_cmd == "resume":
            return _order_resume(args, cfg, st)
        if args.orders_cmd == "shutdown":
            return _order_shutdown(args, cfg, st)
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
    if args.audit_cmd is None:
        args.parser.print_usage(sys.stderr)
        print("energy-monitor audit: choose a command: verify", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args, secrets=False)
    st = _open_store(cfg)
    try:
        result = audit.verify(st.conn)
    finally:
        st.close()
    print(str(result), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAIL


# --------------------------------------------------------------------------- meters


def cmd_meters(args: argparse.Namespace) -> int:
    if args.meters_cmd is None:
        args.parser.print_usage(sys.stderr)
        print("energy-monitor meters: choose a command: import, discover", file=sys.stderr)
        return EXIT_USAGE
    if args.meters_cmd == "import":
        return _meters_import(args)
    cfg = _load(args, secrets=False)
    st = _open_store(cfg)
    try:
        found = inventory.discover(st.conn, cfg)
        topics = inventory.unread_topics(st.conn)
    finally:
        st.close()
    if args.toml:
        print(inventory.to_toml(inventory.skeletons(found), header=(
            "# devices seen but not configured (energy-monitor meters discover):\n"
            "# give each a group, rated_kw and control, then include this file")), end="")
        return EXIT_OK
    if args.json:
        print(json.dumps({"devices": [d.__dict__ for d in found],
                          "unread_topics": [{"topic": t, "messages": n} for t, n in topics]},
                         indent=2))
        return EXIT_OK
    if not found:
        print("every device seen is configured")
    else:
        print(f"{len(found)} devices seen that no [[meters]] entry or [[meter_patterns]] "
              "entry configures:")
        print(f"  {'device':<36} {'format':<12} {'read as meter':<24} {'first seen':<21} "
              f"{'last seen':<21} refused")
        for d in found:
            print(f"  {d.device:<36} {d.format or '-':<12} {d.meter or '(refused)':<24} "
                  f"{d.first_seen or '-':<21} {d.last_seen or '-':<21} {d.refused}")
        print("configure them: energy-monitor meters discover --toml > new-meters.toml, "
              "edit, and include it; or add a [[meter_patterns]] entry")
    if topics:
        print(f"{len(topics)} topics that no [[sources]] entry reads (dead letter "
              "unknown_topic):")
        for t, n in topics:
            print(f"  {t}  ({n} messages)")
    return EXIT_OK


def _meters_import(args: argparse.Namespace) -> int:
    cfg: Config | None = None
    explicit = getattr(args, "config", None) is not None
    if explicit or config_mod.default_path().exists():
        cfg = _load(args, secrets=False)  # ids and devices must be new to it
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"meters import: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        result = inventory.read_inventory(text, str(args.file), cfg)
    except inventory.InventoryError as exc:
        print(f"meters import: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if result.problems:
        for p in result.problems:
            print(p, file=sys.stderr)
        print(f"meters import: {len(result.problems)} problems in {args.file}; nothing "
              "written", file=sys.stderr)
        return EXIT_FAIL
    toml = inventory.to_toml(result.meters, header=(
        f"# {len(result.meters)} meters imported from {Path(args.file).name} by "
        "energy-monitor meters import\n# include it: include = [\"<this file>\"]"))
    if args.out is None:
        print(toml, end="")
        return EXIT_OK
    try:
        inventory.write_new(args.out, toml, force=args.force)
    except FileExistsError as exc:
        print(f"meters import: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{len(result.meters)} meters written to {args.out}; add "
          f"include = [\"{args.out.name}\"] to the top of the configuration, then run "
          "energy-monitor check-config", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- notify


def test_event(cfg: Config, now: float) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "kind": "notify.test", "severity": "info",
            "site": cfg.site.id, "rule": "", "scope": "site",
            "message": f"Test message from energy-monitor, site {cfg.site.id}"
                       f"{f' ({cfg.site.name})' if cfg.site.name else ''}: this webhook works",
            "value": None, "limit": None, "unit": "", "period": "", "projected": None,
            "at": rfc3339_or_none(now)}


def cmd_notify(args: argparse.Namespace) -> int:
    if args.notify_cmd is None:
        args.parser.print_usage(sys.stderr)
        print("energy-monitor notify: choose a command: test", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args)  # the webhooks' secrets are needed to sign
    if not cfg.webhooks:
        print("notify test: no [[webhooks]] configured", file=sys.stderr)
        return EXIT_FAIL
    failed = 0
    for i, hook in enumerate(cfg.webhooks):
        body = test_event(cfg, time.time())
        text = json.dumps(body, sort_keys=True)
        name = f"webhooks[{i}] {webhooks.describe(hook)} ({hook.format})"
        started = time.monotonic()
        try:
            raw = webhooks.render(hook, text)
            resp = webhooks.urllib_post(hook.url, raw,
                                        webhooks.request_headers(hook, body["event_id"], raw),
                                        hook.timeout_s)
        except webhooks.WebhookError as exc:
            print(f"{name}: FAILED, no response: {exc}")
            failed += 1
            continue
        took = time.monotonic() - started
        if 200 <= resp.status < 300:
            print(f"{name}: ok, HTTP {resp.status} in {took:.2f} s")
        else:
            detail = resp.body[:300].decode("utf-8", "replace").strip()
            print(f"{name}: FAILED, HTTP {resp.status}{': ' + detail if detail else ''}")
            failed += 1
    return EXIT_OK if not failed else EXIT_FAIL


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


def _fix_stdout() -> None:
    """After the reader of our stdout went away (``status | head``): point stdout at
    /dev/null, so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"energy-monitor {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (also APScheduler's job lines)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text lines, or one JSON object per line (journald, Loki)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: `orders --config X list` and `orders list --config X` both work;
        # a nested parser's default must not overwrite what its parent parsed
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="config file (default: $ENERGY_MONITOR_CONFIG, else ./config.toml)")
        return sp

    def command(parent: Any, name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        """A subcommand whose one-line ``text`` is both its entry in the parent's list
        and its own --help description."""
        sp: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text,
                                                        **kw)
        return sp

    sp = with_config(command(sub, "run", "run the daemon in the foreground until SIGTERM or "
                             "SIGINT (the systemd service runs this)"))
    sp.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS,
                    help="as the global --log-format")
    sp.set_defaults(func=cmd_run)
    with_config(command(sub, "check-config", "validate the configuration and say which "
                        "rules apply to this site; exit 78 with one line per problem")
                ).set_defaults(func=cmd_check_config)
    sp = with_config(command(sub, "status", "period totals, rule states and meters from the "
                             "local store, and whether the daemon runs; works after it "
                             "stopped"))
    sp.add_argument("--json", action="store_true", help="machine-readable (SPEC status JSON)")
    sp.set_defaults(func=cmd_status)
    sp = with_config(command(sub, "report", "the compliance report of one calendar month "
                             "(site time zone), from the local store"))
    sp.add_argument("--period", required=True, help="YYYY-MM, in the site's time zone")
    sp.add_argument("--format", choices=["csv", "json", "html", "all"], default="json",
                    help="all: every format into the directory --out, under one digest")
    sp.add_argument("--lang", choices=["en", "ru"], default="en",
                    help="language of the HTML page (JSON and CSV are the same in both)")
    sp.add_argument("--out", type=Path, default=None,
                    help="write to FILE instead of stdout (a directory with --format all)")
    sp.set_defaults(func=cmd_report)

    actor = os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"
    sp = with_config(command(sub, "orders", "orders issued and their outcome; an operator's "
                             "shutdown or resume"))
    osub = sp.add_subparsers(dest="orders_cmd", metavar="COMMAND")
    ol = with_config(command(osub, "list", "recent orders, newest first (the default)"))
    ol.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    ol.add_argument("--json", action="store_true", help="machine-readable")
    orr = with_config(command(osub, "resume", "resume SCOPE (site, group:NAME, meter:ID); "
                              "asks first while a rule covering it is still in breach"))
    orr.add_argument("scope", help="site, group:NAME or meter:ID")
    orr.add_argument("--force", action="store_true",
                     help="resume without asking, even while a rule is in breach")
    orr.add_argument("--actor", default=actor, help="who resumes (recorded in the audit log)")
    orr.add_argument("--reason", default="", help="why (recorded in the audit log)")
    osd = with_config(command(osub, "shutdown", "switch SCOPE off now (site, group:NAME, "
                              "meter:ID): a manual shutdown order, verified like any other"))
    osd.add_argument("scope", help="site, group:NAME or meter:ID")
    osd.add_argument("--actor", default=actor, help="who orders it (recorded in the audit log)")
    osd.add_argument("--reason", default="", help="why (recorded in the audit log)")
    sp.set_defaults(func=cmd_orders, orders_cmd="list", limit=50, json=False)

    sp = with_config(command(sub, "audit", "the tamper-evident audit log"))
    asub = sp.add_subparsers(dest="audit_cmd", metavar="COMMAND")
    with_config(command(asub, "verify", "verify the hash chain; exit 1 and the first bad "
                        "entry if broken"))
    sp.set_defaults(func=cmd_audit, audit_cmd=None, parser=sp)

    sp = with_config(command(sub, "meters", "set up meters at scale: import an inventory, "
                             "discover devices not configured yet"))
    msub = sp.add_subparsers(dest="meters_cmd", metavar="COMMAND")
    mi = with_config(command(msub, "import", "turn an inventory CSV (header: device, id, "
                             "group, rated_kw, control_kind, control_topic, ...) into "
                             "[[meters]] entries; bad rows are reported by line"))
    mi.add_argument("file", type=Path, help="the inventory, CSV with a header row")
    mi.add_argument("--out", type=Path, default=None,
                    help="write a TOML file to include (default: print the TOML)")
    mi.add_argument("--force", action="store_true", help="replace --out if it exists")
    md = with_config(command(msub, "discover", "devices seen (in the store, or refused into "
                             "the dead letters) that no [[meters]] entry or pattern "
                             "configures"))
    md.add_argument("--toml", action="store_true",
                    help="print a [[meters]] entry per device, to edit and include")
    md.add_argument("--json", action="store_true", help="machine-readable")
    sp.set_defaults(func=cmd_meters, meters_cmd=None, parser=sp)

    sp = with_config(command(sub, "notify", "webhooks: send a test message to each"))
    nsub = sp.add_subparsers(dest="notify_cmd", metavar="COMMAND")
    with_config(command(nsub, "test", "send a test message to every configured webhook now "
                        "and report each one's answer; exit 1 if any failed"))
    sp.set_defaults(func=cmd_notify, notify_cmd=None, parser=sp)

    sp = command(sub, "simulate", "publish a simulated fleet of meters "
                 "(energy-monitor simulate --help for its options)", add_help=False)
    sp.add_argument("sim_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`status | head`): not our failure
        _fix_stdout()
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        logsetup.configure()
        return _simulate(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logsetup.configure(verbose=args.verbose, fmt=args.log_format)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.located:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, StoreError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
