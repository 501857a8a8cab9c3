"""The parser package as a whole: interface, registry, shared helpers, reasons, docs."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from monitor import config
from monitor.core.model import ParseError, ParseResult, TsSource
from monitor.intake.parsers import FORMATS, IGNORE_REASONS, REASONS, Parser, make_parser
from monitor.intake.parsers import common as c

ROOT = Path(__file__).resolve().parent.parent
PARSERS = ROOT / "monitor" / "intake" / "parsers"
DOC = ROOT / "docs" / "devices.md"


def test_formats_match_the_config_schema() -> None:
    assert FORMATS == config.FORMATS


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_builds_a_parser(fmt: str) -> None:
    parser: Parser = make_parser(fmt)
    assert callable(parser.parse)
    assert make_parser(fmt, {}) is not parser  # one instance per [[sources]] entry


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_is_a_parse_error_never_another_exception(fmt: str) -> None:
    parser = make_parser(fmt)
    for payload in (b"\xff\xfe\x00", b"hello world", b"{}", b"[]", b"nan", b'"x"', b"{\"a\":"):
        for topic in ("", "/", "a", "tele/x/SENSOR", "shellies/x/relay/0/power",
                      "x/events/rpc", "zigbee2mqtt/x", "x/sensor/power/state", "emon/x",
                      "emon/x/P1", "mbmd/x/Power"):
            try:
                result = parser.parse(topic, payload, 1_800_000_000.0)
            except ParseError as exc:
                assert exc.reason in REASONS
            else:
                assert not result.readings, (topic, payload)


def test_unknown_format_and_option() -> None:
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        make_parser("csv")
    with pytest.raises(ValueError, match="no option 'base_topic'"):
        make_parser("tasmota", {"base_topic": "x"})


def _raised_reasons() -> set[str]:
    """Every literal reason passed to ParseError(...) in the parser sources."""
    found: set[str] = set()
    for path in PARSERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "ParseError"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(str(node.args[0].value))
    return found


def test_every_raised_reason_is_listed() -> None:
    raised = _raised_reasons()
    assert len(list(PARSERS.glob("*.py"))) >= 8, PARSERS
    assert raised - set(REASONS) == set()
    assert set(REASONS) - raised == set()


def test_doc_names_every_format_reason_and_option() -> None:
    text = DOC.read_text(encoding="utf-8")
    for fmt in FORMATS:
        assert f"## `{fmt}`" in text, fmt
    for reason in (*REASONS, *IGNORE_REASONS):
        assert f"| `{reason}` |" in text, reason
    for option in ("base_topic", "power_unit", "energy_unit", "power_sensors",
                   "energy_sensors", "ignore_sensors", "export_sensors", "meter_object",
                   "energy_key", "power_key", "export_key", "sum_as_import"):
        assert f"`{option}`" in text, option


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "reason"),
    [(None, "nan"), (math.nan, "nan"), (math.inf, "infinite"), (-math.inf, "infinite"),
     (10**400, "infinite"), (True, "wrong_type"), ("1", "wrong_type"), ([1], "wrong_type"),
     ({}, "wrong_type")],
)
def test_number_rejects(value: object, reason: str) -> None:
    with pytest.raises(ParseError) as exc:
        c.number(value, "x")
    assert exc.value.reason == reason


def test_number_and_measurement_accept() -> None:
    assert c.number(-2, "x") == -2.0
    assert c.measurement(0, "x") == 0.0
    assert c.measurement(2.5, "x") == 2.5
    with pytest.raises(ParseError, match="negative"):
        c.measurement(-0.001, "x")


@pytest.mark.parametrize(
    ("text", "reason"),
    [("nan", "nan"), ("NaN", "nan"), ("-nan", "nan"), ("None", "nan"), ("null", "nan"),
     ("inf", "infinite"), ("-Infinity", "infinite"), ("1e999", "infinite"),
     ("1_0", "not_a_number"), ("12.3.4", "not_a_number"), ("0x10", "not_a_number"),
     ("true", "not_a_number"), ("--", "not_a_number")],
)
def test_text_number_rejects(text: str, reason: str) -> None:
    with pytest.raises(ParseError) as exc:
        c.text_number(text, "x")
    assert exc.value.reason == reason


def test_text_measurement_strips_whitespace() -> None:
    assert c.text_measurement(b" 12.500\n", "x") == 12.5
    assert c.text_measurement(b"1e3", "x") == 1000.0


def test_conversions_are_clean_decimals() -> None:
    assert c.kwh_from_wh(0.06) == 6e-05
    assert c.kwh_from_wh(26289.44) == 26.28944
    assert c.kwh_from_wmin(60000) == 1.0
    assert c.w_from_kw(1.234) == 1234.0


def test_aux_drops_unusable_values() -> None:
    assert c.aux(230) == 230.0
    assert [c.aux(v) for v in (None, "230", True, math.nan, math.inf, -1)] == [None] * 6


def test_times() -> None:
    assert c.rfc3339("2026-11-27T02:00:00Z") == 1_795_744_800.0
    assert c.rfc3339("2026-11-27T02:00:00") is None  # no offset: ambiguous
    assert c.rfc3339("nope") is None
    assert c.epoch(1_795_744_800) == 1_795_744_800.0
    assert c.epoch(1_795_744_800_000) == 1_795_744_800.0
    assert [c.epoch(v) for v in (True, "1", math.nan, None)] == [None] * 4
    assert c.stamp(1_795_744_800.0, 5.0) == (1_795_744_800.0, TsSource.DEVICE)
    assert c.stamp(1000.0, 1_800_000_000.0) == (1_800_000_000.0, TsSource.RECEIVED)
    assert c.stamp(None, 7.0) == (7.0, TsSource.RECEIVED)


def test_load_json_errors() -> None:
    for payload, reason in ((b"", "empty"), (b" \n", "empty"), (b"\x80", "not_utf8"),
                            (b"{", "not_json"), (b"[" * 50_000, "not_json"),
                            (b"1" * 5000, "not_json")):
        with pytest.raises(ParseError) as exc:
            c.load_json(payload)
        assert exc.value.reason == reason, payload[:10]


def test_ignored_carries_a_known_reason() -> None:
    res = c.ignored("daily_total")
    assert res == ParseResult(ignored="daily_total")
    assert not res.readings and not res.availability
    with pytest.raises(AssertionError):
        c.ignored("no such reason")
