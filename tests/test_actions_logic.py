"""Order logic over a real SQLite store, without a broker: shed sizing, de-duplication,
ids, device dialects, the transaction guards and failed publications."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.act.model import ActionsError, UlidFactory, device_command
from monitor.act.orders import Actions
from monitor.app import cli
from monitor.config import ControlConfig
from monitor.intake.mqtt import MqttError
from monitor.metrics import Metrics
from monitor.store.db import transaction
from monitor.store.ledger import Store
from tests.test_actions import (
    RATED_W,
    T0,
    Clock,
    events,
    make_config,
    make_emit,
    seed_meters,
    verdict,
)


class Recorder:
    """A publish callable that records, or fails like MqttLink.publish does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | bytes]] = []
        self.fail = False
        self.result: object = None

    def __call__(self, topic: str, payload: str | bytes, qos: int, retain: bool) -> object:
        assert (qos, retain) == (1, False)
        if self.fail:
            raise MqttError(f"publish to {topic} failed: the connection was lost")
        self.sent.append((topic, payload))
        return self.result


class Unacked:
    """What paho returns for a message the broker has not acknowledged in time."""

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None

    def is_published(self) -> bool:
        return False


Make = Callable[..., tuple[Actions, Store, Recorder, Clock]]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    stores: list[Store] = []

    def build(**actions: Any) -> tuple[Actions, Store, Recorder, Clock]:
        config = make_config(tmp_path, **actions)
        st = Store(config.storage.path)
        stores.append(st)
        seed_meters(st.conn)
        rec, clock = Recorder(), Clock()
        return Actions(config, rec, make_emit(config, clock), clock=clock,
                       ack_timeout_s=0.01), st, rec, clock

    yield build
    for st in stores:
        st.close()


# --------------------------------------------------------------------------- shed sizing


def test_shed_plan_without_priority_takes_the_largest_meters_first(make: Make) -> None:
    act, st, _, _ = make()
    plan = act.planner.plan_shed(st.conn, "site", 4.0)  # 8.0 kW -> at most 4.0 kW
    assert plan.shed == ("rack-01", "rack-02")  # 3000 + 2500 W
    assert (plan.before_w, plan.after_w, plan.reaches_target) == (8000.0, 2500.0, True)
    assert act.planner.plan_shed(st.conn, "site", 8.0).shed == ()
    assert act.planner.plan_shed(st.conn, "group:hall-b", 0.7).shed == ("rack-03",)


def test_shed_plan_sheds_priority_groups_whole_and_in_the_listed_order(make: Make) -> None:
    act, st, _, _ = make(shed_priority=["hall-b", "hall-c"])
    # 8.0 kW -> 6.0 kW: hall-b (1.5 kW) is not enough, hall-c (1.0 kW) goes too
    plan = act.planner.plan_shed(st.conn, "site", 6.0)
    assert plan.shed == ("rack-03", "rack-04", "rack-05", "rack-06")
    assert plan.after_w == 5500.0
    # 8.0 kW -> 7.0 kW: hall-b alone is enough
    assert act.planner.plan_shed(st.conn, "site", 7.0).shed == ("rack-03", "rack-04")
    # 8.0 kW -> 5.0 kW: both groups, then the largest of the rest
    assert act.planner.plan_shed(st.conn, "site", 5.0).shed == (
        "rack-03", "rack-04", "rack-05", "rack-06", "rack-01")
    # a priority group outside the scope plays no part
    assert act.planner.plan_shed(st.conn, "group:hall-a", 3.0).shed == ("rack-01",)
    # target 0: everything that draws
    assert set(act.planner.plan_shed(st.conn, "site", 0.0).shed) == set(RATED_W)


def test_shed_plan_counts_unknown_power_at_the_rating_and_skips_idle_meters(make: Make) -> None:
    act, st, _, _ = make()
    with transaction(st.conn):
        st.conn.execute("UPDATE meters SET power_w = NULL WHERE id = 'rack-01'")  # rated 3.5 kW
        st.conn.execute("UPDATE meters SET power_w = 0 WHERE id = 'rack-02'")
    plan = act.planner.plan_shed(st.conn, "group:hall-a", 0.0)
    assert plan.shed == ("rack-01",) and plan.before_w == 3500.0


def test_limit_without_a_target_is_carried_out_as_a_shutdown(make: Make) -> None:
    act, st, _, _ = make()
    with transaction(st.conn):
        [order] = act.apply(st.conn, verdict("monthly-cap", "group:hall-a"), ("limit",),
                            False, T0)
        with pytest.raises(ActionsError, match="target_kw"):
            act.order(st.conn, "limit", "site", "x", "y", T0)
    assert order.action == "shutdown" and order.meters == ("rack-01", "rack-02")


# --------------------------------------------------------------------------- de-duplication


def test_an_identical_order_in_force_is_not_re_issued_but_a_failed_one_is(make: Make) -> None:
    act, st, _, _ = make(confirm_within_s=10, max_resends=0)
    with transaction(st.conn):
        first = act.order(st.conn, "shutdown", "group:hall-a", "cap", "r", T0)
        assert act.order(st.conn, "shutdown", "group:hall-a", "cap", "r", T0 + 1) is None
        # a narrower scope whose meters are already held off: nothing to do either
        assert act.order(st.conn, "shutdown", "meter:rack-01", "other", "r", T0 + 2) is None
        # a wider scope is a new order: it takes over rack-01 and rack-02 as well
        wider = act.order(st.conn, "shutdown", "site", "ban", "r", T0 + 3)
    assert first is not None and wider is not None
    with transaction(st.conn):
        progress = act.verify(st.conn, T0 + 20)
    assert progress.superseded == [first.order_id] and progress.failed == [wider.order_id]
    with transaction(st.conn):
        again = act.order(st.conn, "shutdown", "site", "ban", "r", T0 + 30)
    assert again is not None and again.state == "pending"


def test_resolving_scopes(make: Make, tmp_path: Path) -> None:
    act, st, _, _ = make()
    assert act.planner.resolve("group:hall-c") == ("rack-05", "rack-06")
    assert act.planner.resolve("meter:rack-03") == ("rack-03",)
    for bad in ("group:nope", "meter:nope", "hall-a", "group:"):
        with pytest.raises(ActionsError):
            act.planner.resolve(bad)
    # a site without [[meters]]: every meter the store has seen
    bare = make_config(tmp_path / "bare")
    bare = bare.model_copy(update={"meters": []})
    plain = Actions(bare, None, make_emit(bare, Clock()))
    assert plain.planner.resolve("site", st.conn) == tuple(sorted(RATED_W))


# --------------------------------------------------------------------------- publication


def test_order_and_verify_need_the_callers_transaction_and_publish_needs_none(
        make: Make) -> None:
    act, st, rec, _ = make()
    with pytest.raises(ActionsError, match="transaction"):
        act.order(st.conn, "shutdown", "site", "r", "x", T0)
    with pytest.raises(ActionsError, match="transaction"):
        act.verify(st.conn, T0)
    with transaction(st.conn):
        act.order(st.conn, "shutdown", "meter:rack-01", "r", "x", T0)
        with pytest.raises(ActionsError, match="after the commit"):
            act.publish_pending(st.conn)
    assert rec.sent == []
    assert act.publish_pending(st.conn) == 1
    assert [t for t, _ in rec.sent] == ["energy-monitor/irk-01/orders", "cmnd/pow1/POWER"]


def test_a_failed_publication_stays_due_and_is_retried_later(make: Make) -> None:
    act, st, rec, clock = make()
    with transaction(st.conn):
        act.order(st.conn, "shutdown", "meter:rack-01", "r", "x", T0)
    rec.fail = True
    assert act.publish_pending(st.conn) == 0
    due = st.conn.execute("SELECT publish_due, published_at FROM orders").fetchone()
    assert due == (T0 + act.publisher.retry_s, None)
    rec.fail = False
    assert act.publish_pending(st.conn) == 0  # not yet due again
    clock.t = T0 + act.publisher.retry_s
    assert act.publish_pending(st.conn) == 1
    assert st.conn.execute("SELECT publish_due, published_at FROM orders").fetchone() == (
        None, T0 + act.publisher.retry_s)


def test_a_publication_the_broker_did_not_acknowledge_is_retried(make: Make) -> None:
    act, st, rec, clock = make()
    with transaction(st.conn):
        act.order(st.conn, "resume", "meter:rack-01", "", "x", T0, actor="operator")
    rec.result = Unacked()
    assert act.publish_pending(st.conn) == 0
    rec.result = None
    clock.t = T0 + act.publisher.retry_s
    assert act.publish_pending(st.conn) == 1
    assert [p for t, p in rec.sent if t == "cmnd/pow1/POWER"] == ["ON", "ON"]


def test_without_a_publish_callable_orders_wait_for_the_daemon(make: Make, tmp_path: Path
                                                               ) -> None:
    act, st, _, clock = make()
    cli = Actions(act.config, None, make_emit(act.config, clock), clock=clock)
    with transaction(st.conn):
        op = cli.resume(st.conn, "group:hall-a", T0)
    assert cli.publish_pending(st.conn) == 0
    assert act.publish_pending(st.conn) == 1  # the daemon's instance sends it
    assert op.actor == "operator"


# --------------------------------------------------------------------------- values


def test_ulids_are_26_crockford_chars_and_strictly_increasing() -> None:
    make_id = UlidFactory(randbytes=lambda n: b"\xff" * n)
    ids = [make_id(T0), make_id(T0), make_id(T0 - 5), make_id(T0 + 0.001)]
    assert all(len(i) == 26 and set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert make_id(0.0) > ids[-1]  # the clock going back never reorders ids


@pytest.mark.parametrize(("kind", "topic", "off", "on"), [
    ("tasmota", "cmnd/pow7/POWER", ("cmnd/pow7/POWER", "OFF"), ("cmnd/pow7/POWER", "ON")),
    ("shelly_gen1", "shellies/sh1/relay/0/command",
     ("shellies/sh1/relay/0/command", "off"), ("shellies/sh1/relay/0/command", "on")),
    ("zigbee2mqtt", "zigbee2mqtt/plug", ("zigbee2mqtt/plug/set", '{"state":"OFF"}'),
     ("zigbee2mqtt/plug/set", '{"state":"ON"}')),
    ("zigbee2mqtt", "zigbee2mqtt/plug/set", ("zigbee2mqtt/plug/set", '{"state":"OFF"}'),
     ("zigbee2mqtt/plug/set", '{"state":"ON"}')),
])
def test_device_commands(kind: str, topic: str, off: tuple[str, str],
                         on: tuple[str, str]) -> None:
    control = ControlConfig(kind=kind, topic=topic)
    assert device_command(control, "m", False, "01X") == off
    assert device_command(control, "m", True, "01X") == on


def test_shelly_gen2_and_json_commands() -> None:
    gen2 = ControlConfig(kind="shelly_gen2", topic="shellypro4pm-ab/rpc", channel=2)
    topic, payload = device_command(gen2, "m", False, "01X")
    assert topic == "shellypro4pm-ab/rpc"
    assert json.loads(payload) == {"id": 1, "src": "energy-monitor", "method": "Switch.Set",
                                   "params": {"id": 2, "on": False}}
    js = ControlConfig(kind="json", topic="site/plc/cmd")
    assert device_command(js, "rack-9", True, "01X") == (
        "site/plc/cmd", '{"action":"resume","meter":"rack-9","order_id":"01X"}')


def test_list_orders_newest_first_with_the_cli_fields(make: Make) -> None:
    act, st, _, _ = make(max_orders_per_hour=1)
    with transaction(st.conn):
        act.order(st.conn, "shutdown", "meter:rack-01", "cap", "r", T0)
        act.order(st.conn, "resume", "meter:rack-01", "cap", "r", T0 + 1)  # refused
    listed = act.list_orders(st.conn, 10)
    assert [(o["action"], o["state"]) for o in listed] == [("resume", "refused"),
                                                           ("shutdown", "pending")]
    assert listed[1]["meters"] == ["rack-01"] and listed[1]["issued_at"] == "2026-11-18T11:06:40Z"
    assert listed[1]["dry_run"] is False and listed[1]["resends"] == 0
    assert act.list_orders(st.conn, 1) == listed[:1]
    [refused] = events(st.conn, "order.failed")
    assert refused["severity"] == "warning"  # a refused resume leaves the load off: not critical


def test_outcomes_are_counted_in_metrics(make: Make) -> None:
    act, st, _, clock = make(max_orders_per_hour=1, confirm_within_s=10, max_resends=1)
    metrics = Metrics()
    counted = Actions(act.config, Recorder(), make_emit(act.config, clock), clock=clock,
                      metrics=metrics)
    with transaction(st.conn):
        counted.order(st.conn, "shutdown", "meter:rack-01", "cap", "r", T0)
        counted.order(st.conn, "resume", "meter:rack-01", "cap", "r", T0 + 1)
        counted.verify(st.conn, T0 + 10)
        counted.verify(st.conn, T0 + 20)

    def n(action: str, outcome: str) -> float:
        return float(metrics.orders.labels(action, outcome)._value.get())

    assert (n("shutdown", "issued"), n("resume", "refused")) == (1, 1)
    assert (n("shutdown", "resent"), n("shutdown", "failed")) == (1, 1)


def test_an_operator_resume_says_which_rules_it_overrides(make: Make) -> None:
    act, st, _, _ = make()
    with transaction(st.conn):
        st.conn.execute("INSERT INTO alert_state (rule, scope, state) VALUES"
                        " ('monthly-cap', 'group:hall-a', 'breach')")
        op = act.resume(st.conn, "site", T0)
    assert "overriding rules still in breach: rack-01 (monthly-cap), rack-02 (monthly-cap)" in (
        op.reason)
    [ev] = events(st.conn, "order.issued")
    assert "overriding" in ev["message"] and ev["severity"] == "info"


def test_cli_orders_resume_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "monitor.db"
    conf = tmp_path / "config.toml"
    conf.write_text(
        '[site]\nid = "irk-01"\ncategory = "individual"\n\n'
        '[[sources]]\ntopic = "tele/+/SENSOR"\nformat = "tasmota"\n\n'
        '[[meters]]\nid = "rack-01"\ndevice = "tasmota/pow1"\ngroup = "hall-a"\n'
        'control = { kind = "tasmota", topic = "cmnd/pow1/POWER" }\n\n'
        f'[storage]\npath = "{db}"\n')
    Store(db).close()
    assert cli.main(["orders", "resume", "group:hall-a", "--config", str(conf),
                     "--actor", "ivan", "--reason", "cap reset"]) == 0
    assert cli.main(["orders", "list", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "resume" in out and "group:hall-a" in out and "by=ivan" in out
    assert cli.main(["orders", "list", "--json", "--config", str(conf)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["action"], row["actor"], row["meters"], row["state"]) == (
        "resume", "ivan", ["rack-01"], "sent")
    assert row["id"] == row["order_id"]
    st = Store(db)
    try:
        assert [k for (k,) in st.conn.execute("SELECT kind FROM audit ORDER BY seq")
                if k.startswith(("order", "operator"))] == ["operator.resume"]
        assert st.conn.execute("SELECT publish_due IS NOT NULL FROM orders").fetchone() == (1,)
    finally:
        st.close()


# --------------------------------------------------------------------------- layout

ACT = Path(__file__).resolve().parent.parent / "monitor" / "act"
SQL = re.compile(r"\b(SELECT\b.*\bFROM|INSERT\b.*\bINTO|UPDATE\b.*\bSET|DELETE\s+FROM)\b", re.S)


def sql_sites(path: Path) -> list[str]:
    """Lines of ``path`` that run SQL (``.execute*`` calls) or hold SQL text."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")):
            found.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and SQL.search(node.value)):
            found.append(f"{path.name}:{node.lineno}: {node.value[:40]!r}")
    return found


def test_all_sql_of_the_orders_layer_is_in_its_repository() -> None:
    """plan, issue, resume, verify and publish call monitor.act.repo; none writes SQL."""
    assert sql_sites(ACT / "repo.py")  # the check can see SQL where there is some
    others = sorted(p for p in ACT.glob("*.py") if p.name != "repo.py")
    assert {p.name for p in others} >= {"plan.py", "issue.py", "resume.py", "verify.py",
                                        "publish.py", "orders.py", "model.py", "journal.py"}
    assert [s for p in others for s in sql_sites(p)] == []


def test_the_facade_only_delegates() -> None:
    """Every method of Actions is a single statement (a docstring aside) or, for
    ``apply`` and ``tick``, a few calls into the modules that do the work; it holds
    no SQL, no loop and no condition of its own beyond combining two results."""
    tree = ast.parse((ACT / "orders.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Actions"]
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name == "__init__":
            continue
        body = [s for s in fn.body if not (isinstance(s, ast.Expr)
                                           and isinstance(s.value, ast.Constant))]
        assert len(body) <= 4, fn.name
        assert not any(isinstance(n, ast.For | ast.While) for n in ast.walk(fn)), fn.name
