"""The import rules of the packages (README, "Architecture"), checked over every module.

Each package may import only the packages listed for it; everything else is a
failure that names the module, the line and the rule.  Imports inside functions
count too.  ``TYPE_CHECKING``-only imports count as well: a type is a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the packages it may import (besides itself and the standard library).
#: Lower layers first; the order is the data flow of the README's picture.
ALLOWED: dict[str, set[str]] = {
    "monitor.core": set(),                                   # pure: values and arithmetic
    "monitor.metrics": set(),
    "monitor.config": {"monitor.core", "monitor.intake.parsers"},  # validates source options
    "monitor.store": {"monitor.core"},                       # SQLite only, no MQTT
    "monitor.intake.parsers": {"monitor.core"},              # pure: bytes -> readings
    "monitor.intake": {"monitor.core", "monitor.config", "monitor.metrics", "monitor.store"},
    "monitor.outputs": {"monitor.core", "monitor.config", "monitor.metrics", "monitor.store"},
    "monitor.rules": {"monitor.core", "monitor.config", "monitor.metrics", "monitor.store",
                      "monitor.outputs"},
    "monitor.act": {"monitor.core", "monitor.config", "monitor.metrics", "monitor.store",
                    "monitor.intake.mqtt"},  # events reach outputs through a callback
    "monitor.report": {"monitor.core", "monitor.config", "monitor.store",
                       "monitor.rules.evaluate"},
    "monitor.app": {"monitor", "sim"},                       # the wiring may use everything
    "monitor": {"monitor.app"},                              # __init__, __main__
    "sim": {"monitor.core", "monitor.config"},               # the simulator is not the daemon
}
#: no module may import these, whatever its package (third-party edges per layer)
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "monitor.core": {"paho", "sqlite3", "influxdb_client", "apscheduler", "urllib", "socket",
                     "http", "requests", "prometheus_client", "threading"},
    "monitor.store": {"paho", "influxdb_client", "urllib", "http"},
    "monitor.intake.parsers": {"paho", "sqlite3", "influxdb_client", "urllib"},
    "monitor.rules": {"paho", "influxdb_client", "urllib"},
    "monitor.report": {"paho", "influxdb_client"},
    "monitor.outputs": {"paho"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str, table: dict[str, set[str]] | dict[str, object]) -> str | None:
    """The most specific key of ``table`` that ``module`` is, or is inside."""
    best = None
    for pkg in table:
        if (module == pkg or module.startswith(pkg + ".")) and (best is None
                                                                or len(pkg) > len(best)):
            best = pkg
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    mod = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # ``from monitor import config`` imports the module monitor.config
            subs = [(node.lineno, f"{name}.{a.name}") for a in node.names
                    if (ROOT / name.replace(".", "/") / f"{a.name}.py").exists()
                    or (ROOT / name.replace(".", "/") / a.name).is_dir()]
            out += subs or [(node.lineno, name)]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
                out.append((node.lineno, str(node.args[0].value)))
    return out


def violations(paths: list[Path]) -> list[str]:
    found: list[str] = []
    for path in paths:
        mod = _module_name(path)
        own = _package_of(mod, ALLOWED)
        assert own is not None, f"{mod} is in no package of the import rules"
        allowed = ALLOWED[own]
        bad_3rd = FORBIDDEN_THIRD_PARTY.get(_package_of(mod, FORBIDDEN_THIRD_PARTY) or "", set())
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in bad_3rd:
                found.append(f"{path.relative_to(ROOT)}:{line}: {own} must not import {name}")
                continue
            if top not in ("monitor", "sim"):
                continue
            if name == own or name.startswith(own + "."):
                continue  # inside its own package
            if any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            if name == "monitor":
                continue  # the root package: ``from monitor import __version__``
            found.append(f"{path.relative_to(ROOT)}:{line}: {own} must not import {name} "
                         f"(it may import: {', '.join(sorted(allowed)) or 'nothing'})")
    return found


def _sources() -> list[Path]:
    return sorted([*ROOT.joinpath("monitor").rglob("*.py"), *ROOT.joinpath("sim").rglob("*.py")])


def test_every_package_imports_only_what_its_rule_allows() -> None:
    assert len(_sources()) > 40
    assert violations(_sources()) == []


def test_every_subpackage_states_its_job() -> None:
    for init in ROOT.joinpath("monitor").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 30, f"{init.relative_to(ROOT)} has no docstring stating its job"


@pytest.mark.parametrize(("where", "line"), [
    ("monitor/core/forbidden_probe.py", "import sqlite3\n"),
    ("monitor/core/forbidden_probe.py", "from monitor.store import db\n"),
    ("monitor/store/forbidden_probe.py", "from monitor.intake import mqtt\n"),
    ("monitor/store/forbidden_probe.py", "import paho.mqtt.client\n"),
    ("monitor/outputs/forbidden_probe.py", "from monitor.rules import evaluate\n"),
    ("monitor/outputs/forbidden_probe.py", "from monitor.act import orders\n"),
    ("monitor/rules/forbidden_probe.py", "from monitor.act import orders\n"),
    ("monitor/intake/forbidden_probe.py", "from monitor.rules.evaluate import evaluate_all\n"),
    ("monitor/intake/parsers/forbidden_probe.py", "from monitor.store import ledger\n"),
    ("monitor/report/forbidden_probe.py", "from monitor.rules import check\n"),
    ("monitor/rules/forbidden_probe.py", "def f():\n    from sim import simulate\n"),
    ("sim/forbidden_probe.py", "from monitor.store.ledger import Store\n"),
    ("monitor/core/forbidden_probe.py", "from ..store import db\n"),
])
def test_a_forbidden_import_is_caught(tmp_path: Path, where: str, line: str) -> None:
    """The check fails when a forbidden import is added (the probe is written in the
    tree, checked, and removed)."""
    probe = ROOT / where
    assert not probe.exists()
    probe.write_text(f'"""probe"""\n{line}')
    try:
        found = violations([probe])
    finally:
        probe.unlink()
    assert len(found) == 1 and "must not import" in found[0], found


def test_the_daemon_never_loads_the_simulator() -> None:
    """``run`` imports the service and the CLI; neither pulls in ``sim``."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    code = ("import sys, monitor.app.cli, monitor.app.service; "
            "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- tables

_WRITE = re.compile(r"\b(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE|DELETE\s+FROM)"
                    r"\s+([a-z_]+)", re.I)
_READ = re.compile(r"\b(?:FROM|JOIN)\s+([a-z_]+)", re.I)


def _sql_strings(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values
                           if isinstance(v, ast.Constant) and isinstance(v.value, str))
            out.append((node.lineno, text))
    return out


def table_violations(paths: list[Path]) -> list[str]:
    from monitor.store.schema import TABLES  # noqa: PLC0415
    found = []
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        if rel == "monitor/store/schema.py":
            continue
        mod = _module_name(path)
        for line, text in _sql_strings(path):
            if not re.search(r"\b(SELECT|INSERT|UPDATE|DELETE|REPLACE)\b", text):
                continue
            for m in _WRITE.finditer(text):
                t = TABLES.get(m.group(1))
                if t is None:
                    continue
                if m.group(1) == "kv" and mod != "monitor.store.kv":
                    found.append(f"{rel}:{line}: writes kv outside monitor.store.kv")
                elif not (mod == t.writer or mod.startswith(t.writer + ".")):
                    found.append(f"{rel}:{line}: writes {m.group(1)}, owned by {t.writer}")
            for m in _READ.finditer(_WRITE.sub(" ", text)):
                t = TABLES.get(m.group(1))
                if t is None:
                    continue
                if not any(mod == p or mod.startswith(p + ".") for p in (t.writer, *t.readers)):
                    found.append(f"{rel}:{line}: reads {m.group(1)}, not a listed reader")
    return sorted(set(found))  # an f-string's parts are also seen as constants


def test_each_table_has_one_writer_and_listed_readers() -> None:
    assert table_violations(_sources()) == []


def test_the_ownership_map_covers_every_table(tmp_path: Path) -> None:
    from monitor.store.ledger import Store  # noqa: PLC0415
    from monitor.store.schema import TABLES  # noqa: PLC0415
    st = Store(tmp_path / "m.db")
    names = {r[0] for r in st.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
             if not r[0].startswith("sqlite_")}
    st.close()
    assert names == set(TABLES)
    assert all(t.writer in ALLOWED for t in TABLES.values())


@pytest.mark.parametrize(("where", "code"), [
    ("monitor/rules/forbidden_probe.py", 'SQL = "INSERT INTO export_outbox (line) VALUES (?)"\n'),
    ("monitor/outputs/forbidden_probe.py", 'SQL = "UPDATE kv SET value = 1"\n'),
    ("monitor/intake/forbidden_probe.py", 'SQL = "SELECT * FROM orders"\n'),
    ("monitor/app/forbidden_probe.py", 'SQL = f"DELETE FROM readings WHERE id < {1}"\n'),
])
def test_a_write_by_another_package_is_caught(where: str, code: str) -> None:
    probe = ROOT / where
    assert not probe.exists()
    probe.write_text(f'"""probe"""\n{code}')
    try:
        found = table_violations([probe])
    finally:
        probe.unlink()
    assert len(found) == 1, found
