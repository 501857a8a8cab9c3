"""Property tests for the config loader: whatever the document, only ConfigError, naming the key.

Three kinds of input, from the repository's own ``config.toml`` and a minimal
valid document:

* mutations of a valid document: a key deleted, a value replaced by any TOML
  value (other types, huge numbers, inf/nan, odd strings, tables, arrays,
  dates), an unknown key added at any depth;
* arbitrary bytes and text written to a file and loaded (not TOML, not UTF-8,
  valid TOML of the wrong shape);
* includes that point anywhere (missing files, directories, themselves).

``load``/``parse`` either return a Config or raise :class:`ConfigError` whose every
line is ``dotted.key: what is wrong`` (or names the file); an unknown key is
named by its own dotted path.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import config as config_mod
from monitor.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = tomllib.loads((ROOT / "config.toml").read_text())
MINIMAL: dict[str, Any] = {
    "site": {"id": "prop-site", "timezone": "Europe/Moscow", "category": "legal_entity"},
    "mqtt": {"host": "127.0.0.1", "port": 1883},
    "storage": {"path": "/tmp/prop-monitor.db"},
    "sources": [{"topic": "tele/+/SENSOR", "format": "tasmota"}],
    "rules": [{"id": "cap", "kind": "energy_cap", "period": "calendar_month",
               "scope": "site", "limit_kwh": 6000, "warn_at": [0.8]}],
}
BASES = [REPO_CONFIG, MINIMAL]

KEYS = st.one_of(
    st.sampled_from(["id", "topic", "format", "limit_kwh", "period", "scope", "device",
                     "path", "port", "host", "timezone", "category", "warn_at", "on_breach",
                     "include", "dates", "yearly", "control", "kind", "url", "secret_file"]),
    st.text(st.characters(codec="utf-8"), min_size=1,
            max_size=12),
)
SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.sampled_from(["", "${UNSET_PROP_VAR}", "$", "${", "../..",
                                           "/dev/null", "tele/#", "+", "a" * 5000]),
    st.dates(), st.datetimes(), st.times(),
    st.datetimes(timezones=st.just(dt.UTC)),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out: list[tuple[str | int, ...]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _at(data: Any, path: tuple[str | int, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


def _check(data: dict[str, Any], base_dir: Path) -> ConfigError | None:
    try:
        config_mod.parse(data, base_dir, secrets=False)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError says what is wrong"
        tops = set(data) | set(config_mod.Config.model_fields)
        for line in exc.problems:
            # every line names a key of the document: ``site.id: ...``, ``rules[2].x: ...``
            top = re.match(r"^([^.\[:]*)", line)
            assert ": " in line and top is not None and top.group(1) in tops, line
        return exc
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_documents_raise_only_config_error(tmp_path_factory: Any,
                                                   data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    doc.pop("include", None)  # profiles are loaded by tests/test_profiles.py
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = _at(doc, path[:-1])
        what = data.draw(st.sampled_from(["delete", "replace"]))
        try:
            if what == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
        paths = _paths(doc) or [("site",)]
    _check(doc, tmp_path_factory.mktemp("cfg"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_an_unknown_key_is_named_by_its_path(data: st.DataObject) -> None:
    doc = copy.deepcopy(MINIMAL)
    tables = [p for p in _paths(doc) if isinstance(_at(doc, p), dict)] + [()]
    where = data.draw(st.sampled_from(tables))
    key = data.draw(st.text(st.characters(min_codepoint=97, max_codepoint=122),
                            min_size=3, max_size=10).map(lambda s: "zz" + s))
    _at(doc, where)[key] = data.draw(VALUES)
    exc = _check(doc, Path())
    assert exc is not None, f"unknown key {key!r} accepted"
    name = _dotted((*where, key))
    assert f"{name}: unknown key" in exc.problems, (name, exc.problems)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)))
def test_any_file_content_loads_or_raises_config_error(tmp_path_factory: Any,
                                                       content: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_bytes(content)
    try:
        config_mod.load(path, secrets=False)
    except ConfigError as exc:
        assert exc.problems
    else:
        raise AssertionError("a document without [site] was accepted")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=30), st.just("."), st.just("config.toml"),
                 st.just("/nonexistent/x.toml"), st.just("/dev/null"), st.just("/")),
       st.booleans())
def test_includes_anywhere_raise_only_config_error(tmp_path_factory: Any, target: str,
                                                   as_list: bool) -> None:
    d = tmp_path_factory.mktemp("cfg")
    path = d / "config.toml"
    inc = f"include = [{json_str(target)}]" if as_list else f"include = {json_str(target)}"
    body = (ROOT / "config.toml").read_text().split("\n")
    body = [ln for ln in body if not ln.startswith("include")]
    path.write_text(inc + "\n" + "\n".join(body))
    try:
        config_mod.load(path, secrets=False)
    except ConfigError as exc:
        assert exc.problems


def json_str(s: str) -> str:
    import json  # noqa: PLC0415

    return json.dumps(s)
