# ruff: noqa: RUF001 - the Russian page is checked in Russian: Cyrillic is meant
"""The inspector's report (issue 12, item 4): legal particulars and the INN check,
meter passports, the inline SVG charts, rules that do not apply in words, "No
monitoring before", a month not begun, the Russian page, autoescaping, and one
run that writes every format under one digest.

Real SQLite stores in ``tmp_path`` (rows inserted as the daemon writes them, as
in ``test_report.py``) and the real CLI entry point.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor import config
from monitor.app import cli
from monitor.config import Config, ConfigError
from monitor.report import build as rp
from monitor.report import render as rr
from monitor.report import write as rw
from monitor.store.ledger import Store
from tests.test_report import (
    IRK,
    IRK_METERS,
    IRK_RULES,
    NOW_IRK,
    insert_daily,
    insert_event,
    insert_meter,
    local,
    make_config,
    t,
)

SVG_NS = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------- INN


def _check(digits: str, weights: list[int]) -> int:
    """The tax service's check digit, written here independently of monitor.config."""
    return sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11 % 10


W10 = [2, 4, 10, 3, 5, 9, 4, 6, 8]
W11 = [7, 2, 4, 10, 3, 5, 9, 4, 6, 8]
W12 = [3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8]


def make_inn(body: str) -> str:
    """A valid INN from its 9 (organisation) or 10 (person) leading digits."""
    if len(body) == 9:
        return body + str(_check(body, W10))
    n11 = body + str(_check(body, W11))
    return n11 + str(_check(n11, W12))


def site_with(**site: Any) -> dict[str, Any]:
    return {"site": {"id": "s", "category": "legal_entity", **site},
            "sources": [{"topic": "m/#", "format": "json"}]}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.parse(data)
    return err.value.problems


@pytest.mark.parametrize("inn", ["7707083893", "500100732259", "7830002293"])
def test_published_inns_are_accepted(inn: str) -> None:
    assert config.parse(site_with(inn=inn)).site.inn == inn


@given(st.text(alphabet="0123456789", min_size=9, max_size=9)
       | st.text(alphabet="0123456789", min_size=10, max_size=10))
def test_every_inn_with_valid_check_digits_is_accepted(body: str) -> None:
    inn = make_inn(body)
    assert config.inn_problem(inn) == ""
    assert config.parse(site_with(inn=inn)).site.inn == inn


@given(st.text(alphabet="0123456789", min_size=9, max_size=10), st.data())
def test_a_wrong_check_digit_is_refused_and_named(body: str, data: st.DataObject) -> None:
    inn = make_inn(body)
    pos = data.draw(st.sampled_from([9] if len(inn) == 10 else [10, 11]))
    wrong = data.draw(st.sampled_from([d for d in "0123456789" if d != inn[pos]]))
    bad = inn[:pos] + wrong + inn[pos + 1:]
    if len(bad) == 12 and pos == 10 and config.inn_problem(bad) == "":
        return  # changing digit 11 can, by chance, make the 12th right again: not here
    msg = problems(site_with(inn=bad))
    assert len(msg) == 1 and msg[0].startswith("site.inn: ")
    assert "check digit" in msg[0] and bad in msg[0]


def test_a_changed_eleventh_digit_of_a_personal_inn_is_refused() -> None:
    rnd = random.Random(12)
    for _ in range(200):
        inn = make_inn("".join(rnd.choice("0123456789") for _ in range(10)))
        d11 = str((int(inn[10]) + 1) % 10)
        bad = inn[:10] + d11 + inn[11]  # the 12th was computed over the old 11th
        expect_ok = _check(bad[:11], W12) == int(bad[11])
        assert (config.inn_problem(bad) == "") == expect_ok


@pytest.mark.parametrize(("value", "words"), [
    ("770708389", "9 digits"),
    ("77070838933", "11 digits"),
    ("7707 083893", "digits only"),
    ("77070838\uff193", "digits only"),  # a full-width digit is not an ASCII digit
    ("", None),  # optional: empty is no INN
])
def test_inn_format(value: str, words: str | None) -> None:
    if words is None:
        assert config.parse(site_with(inn=value)).site.inn == ""
        return
    (msg,) = problems(site_with(inn=value))
    assert msg.startswith("site.inn: ") and words in msg


def test_an_inn_written_as_a_number_asks_for_quotes() -> None:
    (msg,) = problems(site_with(inn=7707083893))
    assert msg.startswith("site.inn: ") and "quotes" in msg


def test_legal_fields_are_optional_and_unknown_ones_are_named() -> None:
    cfg = config.parse(site_with(owner="OOO Angara", address="Angarsk",
                                 supply_contract="No. 1 of 2025-01-15", supply_point="TP-1"))
    assert (cfg.site.owner, cfg.site.supply_point) == ("OOO Angara", "TP-1")
    assert problems(site_with(tax_number="7707083893")) == ["site.tax_number: unknown key"]


def test_meter_passport_keys_and_their_errors() -> None:
    ok = {**site_with(), "meters": [{"id": "m", "device": "d", "serial": "0012345",
                                     "model": "Mercury 234", "verification_date": "2025-03-14",
                                     "next_verification_date": "2035-03-14"}]}
    m = config.parse(ok).meters[0]
    assert m.serial == "0012345" and str(m.next_verification_date) == "2035-03-14"
    bad = {**site_with(), "meters": [{"id": "m", "device": "d", "serial": 12345,
                                      "verification_date": "2025-03-14",
                                      "next_verification_date": "2025-03-14"}]}
    msg = problems(bad)
    assert any(p.startswith("meters[0].serial: ") and "quotes" in p for p in msg)
    assert any(p.startswith("meters[0].next_verification_date: ")
               and "after verification_date" in p for p in msg)
    assert any(p.startswith("meters[0].verification_date: ") for p in problems(
        {**site_with(), "meters": [{"id": "m", "device": "d",
                                    "verification_date": "14.03.2025"}]}))


# --------------------------------------------------------------------------- fixtures

LEGAL = {"owner": "OOO Angara Compute", "inn": "3801234567", "address": "665830, Angarsk",
         "supply_contract": "No. 38-123/2025 of 2025-01-15", "supply_point": "TP-118 feeder 5"}


def legal_config(tmp_path: Path, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "site": {"id": "irk-01", "name": "Angarsk farm", "timezone": "Asia/Irkutsk",
                 "region": "RU-IRK", "subregion": "angarsk", "category": "individual",
                 **LEGAL},
        "sources": [{"topic": "tele/+/SENSOR", "format": "tasmota"}],
        "storage": {"path": str(tmp_path / "monitor.db")},
    }
    data.update(extra)
    return config.parse(data)


def irk_meter(i: int, **passport: str) -> dict[str, Any]:
    """``IRK_METERS[i]`` with passport keys."""
    return {**cast(dict[str, Any], IRK_METERS[i]), **passport}


PASSPORTS: list[dict[str, Any]] = [
    irk_meter(0, serial="0041234567", model="Mercury 234",
              verification_date="2024-05-01", next_verification_date="2034-05-01"),
    irk_meter(1, serial="0041234568", model="Mercury 234",
              verification_date="2026-11-10"),  # verified during the month
    irk_meter(2, next_verification_date="2026-11-20"),  # due during the month
    irk_meter(3),
]
RULES = [*IRK_RULES,
         {"id": "moscow-only", "kind": "energy_cap", "regions": ["RU-MOW"], "limit_kwh": 10},
         {"id": "from-2027", "kind": "energy_cap", "limit_kwh": 10,
          "effective_from": "2027-01-01"},
         {"id": "not-angarsk", "kind": "energy_cap", "exclude_subregions": ["angarsk"],
          "limit_kwh": 10}]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Store, Config]]:
    """November 2026 in Irkutsk, monitored since October."""
    cfg = legal_config(tmp_path, meters=PASSPORTS, rules=RULES)
    st_ = Store(cfg.storage.path)
    insert_meter(st_, "rack-07", "hall-a", t(2026, 10, 1, 9), t(2026, 12, 5))
    insert_meter(st_, "rack-08", "hall-a", t(2026, 10, 2), t(2026, 12, 5))
    for day in range(1, 31):
        insert_daily(st_, "rack-07", f"2026-11-{day:02d}", 80.0 + day, 0.5 if day == 3 else 0.0)
        insert_daily(st_, "rack-08", f"2026-11-{day:02d}", 20.25)
    insert_event(st_, 1, "alert.firing", "warning", "monthly-cap", t(2026, 11, 25),
                 period="2026-11", value=2500.0, limit=3000.0, unit="kWh",
                 message="<script>alert('x')</script> 83% used")
    yield st_, cfg
    st_.close()


@pytest.fixture
def report(site: tuple[Store, Config]) -> dict[str, Any]:
    st_, cfg = site
    return rp.build_report(st_, cfg, "2026-11", NOW_IRK)


class Text(HTMLParser):
    """The page's text, and the text of its numeric cells in order."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.cells: list[str] = []
        self._num = False
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self._num = tag == "td" and ("class", "n") in attrs
        if self._num:
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._num = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._num:
            self.cells[-1] += data


def parse_page(html: str) -> Text:
    p = Text()
    p.feed(html)
    p.close()
    return p


def svgs(html: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, flags=re.DOTALL)]


# --------------------------------------------------------------------------- legal and passports


def test_the_report_carries_the_legal_particulars_and_a_signature_block(
        report: dict[str, Any]) -> None:
    for key, value in LEGAL.items():
        assert report["site"][key] == value
    for lang, heading, seal in (("en", "Signatures", "Seal"), ("ru", "Подписи", "М. П.")):
        page = rr.to_html(report, lang)
        text = " ".join(parse_page(page).text)
        assert heading in text and seal in text
        for value in LEGAL.values():
            assert value in text
        tail = text[text.index(heading):]
        assert LEGAL["owner"] in tail and LEGAL["inn"] in tail  # in the signature block


def test_meter_passports_and_whether_verification_covered_the_month(
        report: dict[str, Any]) -> None:
    m = {row["id"]: row for row in report["meters"]}
    assert (m["rack-07"]["serial"], m["rack-07"]["model"]) == ("0041234567", "Mercury 234")
    assert m["rack-07"]["verification_date"] == "2024-05-01"
    assert m["rack-07"]["verified_for_period"] is True
    assert m["rack-08"]["verified_for_period"] is False  # verified on Nov 10 only
    assert m["pump"]["verified_for_period"] is False  # due on Nov 20
    assert m["spare"]["verified_for_period"] is None and m["spare"]["serial"] == ""
    rows = rr.parse_csv(rr.to_csv(report))["meters"]
    assert {r["id"]: r["serial"] for r in rows}["rack-07"] == "0041234567"
    assert "0041234568" in rr.to_html(report, "en")


# --------------------------------------------------------------------------- rules in words


def test_rules_that_do_not_apply_are_described_in_words(report: dict[str, Any]) -> None:
    rules = {r["id"]: r for r in report["rules"]}
    for rid in ("company-cap", "moscow-only", "from-2027", "not-angarsk"):
        reason = rules[rid]["not_in_force_reason"]
        assert rules[rid]["in_force"] is False and reason
        assert not re.search(r"[{}\[\]]|'[\w-]+'", reason), reason  # no Python dict or list
    assert "category legal_entity" in rules["company-cap"]["not_in_force_reason"]
    assert "individual" in rules["company-cap"]["not_in_force_reason"]
    assert "region RU-MOW" in rules["moscow-only"]["not_in_force_reason"]
    assert "from 2027-01-01" in rules["from-2027"]["not_in_force_reason"]
    assert rules["from-2027"]["not_in_force"] == {
        "reason": "not_in_effect", "effective_from": "2027-01-01", "effective_until": None}
    assert rules["not-angarsk"]["not_in_force"]["filters"] == [
        {"filter": "exclude_subregions", "rule": ["angarsk"], "site_key": "subregion",
         "site": "angarsk"}]
    assert rules["monthly-cap"]["not_in_force"] is None
    en = " ".join(parse_page(rr.to_html(report, "en")).text)
    ru = " ".join(parse_page(rr.to_html(report, "ru")).text)
    assert "Rules that do not apply" in en and "Правила, которые не применяются" in ru
    assert "it applies only in region RU-MOW" in en
    assert "правило действует только в регионе RU-MOW" in ru
    assert "с 2027-01-01" in ru
    for page in (en, ru):
        assert "{'" not in page and "':" not in page


def test_only_the_failing_filter_is_named(tmp_path: Path) -> None:
    cfg = legal_config(tmp_path, rules=[
        {"id": "two", "kind": "energy_cap", "limit_kwh": 5, "regions": ["RU-IRK"],
         "categories": ["legal_entity"]}])
    st_ = Store(cfg.storage.path)
    r = rp.build_report(st_, cfg, "2026-11", NOW_IRK)
    st_.close()
    (rule,) = r["rules"]
    assert [f["filter"] for f in rule["not_in_force"]["filters"]] == ["categories"]


# --------------------------------------------------------------------------- chart


def test_chart_figures_pro_rate_the_cap_by_day_length(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "Europe/Berlin",
                      rules=[{"id": "cap", "kind": "energy_cap", "limit_kwh": 745.0},
                             {"id": "big", "kind": "energy_cap", "limit_kwh": 5000.0},
                             {"id": "day", "kind": "energy_cap", "period": "calendar_day",
                              "limit_kwh": 30.0}])
    st_ = Store(cfg.storage.path)
    for day in range(1, 32):
        insert_daily(st_, "m", f"2026-10-{day:02d}", 10.0)
    ber = ZoneInfo("Europe/Berlin")
    r = rp.build_report(st_, cfg, "2026-10", local(ber, 2026, 10, 11, 12))
    st_.close()
    ch = r["chart"]
    assert (ch["rule"], ch["limit_kwh"], ch["daily_limit_kwh"]) == ("cap", 745.0, 30.0)
    days = {d["day"]: d for d in ch["days"]}
    assert days["2026-10-24"]["prorated_limit_kwh"] == pytest.approx(24.0)  # 1 kWh/h
    assert days["2026-10-25"]["prorated_limit_kwh"] == pytest.approx(25.0)  # the DST day
    assert sum(d["prorated_limit_kwh"] for d in ch["days"]) == pytest.approx(745.0)
    assert ch["days"][-1]["cumulative_limit_kwh"] == pytest.approx(745.0)
    # generated on the 11th: the 11th has begun, the 12th has not
    assert days["2026-10-11"]["cumulative_kwh"] == pytest.approx(110.0)
    assert days["2026-10-12"]["kwh"] is None and days["2026-10-12"]["cumulative_kwh"] is None
    assert len(rr.parse_csv(rr.to_csv(r))["chart_kwh"]) == 31


def test_svg_charts_are_inline_well_formed_and_draw_the_figures(
        report: dict[str, Any]) -> None:
    for lang in rr.LANGS:
        page = rr.to_html(report, lang)
        daily, running = svgs(page)
        for svg in (daily, running):
            assert svg.tag == f"{SVG_NS}svg"
            assert not any(k.endswith("href") for el in svg.iter() for k in el.attrib)
        bars = [el for el in daily.iter(f"{SVG_NS}rect") if "bar" in el.get("class", "")
                and el.find(f"{SVG_NS}title") is not None]
        assert len(bars) == 30
        heights = [float(b.get("height", "0")) for b in bars]
        assert heights == sorted(heights)  # rack-07 draws one kWh more each day
        lines = {el.get("class") for el in running.iter(f"{SVG_NS}polyline")}
        assert {"running", "cap", "limit"} <= lines
        points = next(el for el in running.iter(f"{SVG_NS}polyline")
                      if el.get("class") == "running").get("points", "").split()
        ys = [float(p.split(",")[1]) for p in points]
        assert len(points) == 31 and ys == sorted(ys, reverse=True)  # climbs (y grows down)


def test_a_site_without_a_monthly_cap_still_gets_charts(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC")
    st_ = Store(cfg.storage.path)
    r = rp.build_report(st_, cfg, "2026-01", local(ZoneInfo("UTC"), 2026, 2, 1))
    st_.close()
    assert r["chart"]["rule"] is None
    page = rr.to_html(r, "en")
    assert len(svgs(page)) == 2 and "No site-wide monthly cap" in page


# --------------------------------------------------------------------------- Russian


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _numbers_en(cells: list[str]) -> list[list[str]]:
    return [NUMBER.findall(c.replace(",", "")) for c in cells]


def _numbers_ru(cells: list[str]) -> list[list[str]]:
    return [NUMBER.findall(c.replace("\u00a0", "").replace(",", ".")) for c in cells]


def test_russian_page_has_russian_headings_and_the_same_figures(
        report: dict[str, Any]) -> None:
    en, ru = rr.to_html(report, "en"), rr.to_html(report, "ru")
    pe, pr = parse_page(en), parse_page(ru)
    ru_text = " ".join(pr.text)
    for heading in ("Отчёт о соблюдении лимитов", "Владелец и объект", "Отчётный период",
                    "Электроэнергия", "Лимиты и правила", "Счётчики", "Паспорта счётчиков",
                    "Потребление по суткам", "Журнал аудита", "Подписи", "ИНН",
                    "Договор энергоснабжения", "Точка поставки"):
        assert heading in ru_text, heading
    assert '<html lang="ru">' in ru and "Energy compliance report" not in ru_text
    # every numeric cell, in the same order, with the same value
    assert len(pe.cells) > 100 and _numbers_en(pe.cells) == _numbers_ru(pr.cells)
    assert all(n for n in _numbers_en(pe.cells) if n)
    total = report["totals"]["accounted_kwh"]
    assert f"{total:,.3f}" in en
    assert f"{total:,.3f}".replace(",", "\u00a0").replace(".", ",") in ru
    assert report["sha256"] in en and report["sha256"] in ru


def test_an_unknown_language_is_refused() -> None:
    with pytest.raises(ValueError, match="language"):
        rr.renderer("html", "de")


# --------------------------------------------------------------------------- escaping


def test_every_printed_value_is_escaped_in_both_languages(tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>&<b>"
    cfg = legal_config(tmp_path, meters=[{"id": "m<i>", "device": "d", "serial": hostile,
                                          "model": hostile}])
    cfg = cfg.model_copy(update={"site": cfg.site.model_copy(
        update={"name": hostile, "owner": hostile, "address": hostile})})
    st_ = Store(cfg.storage.path)
    insert_meter(st_, "m<i>", "", t(2026, 10, 1), t(2026, 12, 1))
    insert_event(st_, 1, "meter.stale", "warning", "r", t(2026, 11, 5), message=hostile)
    r = rp.build_report(st_, cfg, "2026-11", NOW_IRK)
    st_.close()
    for lang in rr.LANGS:
        page = rr.to_html(r, lang)
        assert "<script>" not in page and "<b>" not in page and "<i>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&lt;b&gt;" in page
        p = parse_page(page)
        assert "script" not in p.tags and "b" not in p.tags and "i" not in p.tags
        assert hostile in " ".join(p.text)
        for svg in svgs(page):
            assert svg.tag == f"{SVG_NS}svg"


# --------------------------------------------------------------------------- periods


def test_a_month_not_begun_is_a_usage_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "Asia/Irkutsk")
    with pytest.raises(rp.PeriodNotStartedError, match="has not started"):
        rw.run(cfg, "2026-12", "json", None, now=local(IRK, 2026, 11, 30, 23, 59))
    assert not Path(cfg.storage.path).exists()  # refused before the store was opened
    st_ = Store(cfg.storage.path)
    with pytest.raises(ValueError, match="2026-12-01T00:00:00\\+08:00"):
        rp.build_report(st_, cfg, "2026-12", local(IRK, 2026, 11, 30, 23, 59))
    # the first instant of the month is the month begun: a report, not complete
    r = rp.build_report(st_, cfg, "2026-12", local(IRK, 2026, 12, 1))
    st_.close()
    assert r["period"]["ended"] is False and r["period"]["complete"] is False


def write_toml(tmp_path: Path, cfg_extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[site]
id = "irk-01"
timezone = "Asia/Irkutsk"
category = "individual"
owner = "OOO Angara"
inn = "3801234567"
{cfg_extra}
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"

[storage]
path = "{tmp_path / 'monitor.db'}"

[[rules]]
id = "monthly-cap"
kind = "energy_cap"
limit_kwh = 3000
""", encoding="utf-8")
    return path


def test_cli_exits_2_for_a_future_month(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path)
    assert cli.main(["report", "--config", str(path), "--period", "2999-01"]) == 2
    err = capsys.readouterr().err
    assert "2999-01 has not started" in err and "Traceback" not in err


def test_a_month_before_monitoring_says_so_and_is_not_complete(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "Asia/Irkutsk", meters=IRK_METERS[:2])
    st_ = Store(cfg.storage.path)
    insert_meter(st_, "rack-07", "hall-a", t(2026, 11, 16, 9, 30), t(2026, 12, 20))
    insert_meter(st_, "rack-08", "hall-a", t(2026, 11, 20), t(2026, 12, 20))
    for day in range(16, 31):
        insert_daily(st_, "rack-07", f"2026-11-{day:02d}", 50.0)
    nov = rp.build_report(st_, cfg, "2026-11", NOW_IRK)
    octo = rp.build_report(st_, cfg, "2026-10", NOW_IRK)
    dec = rp.build_report(st_, cfg, "2026-12", local(IRK, 2027, 1, 2))
    st_.close()
    per = nov["period"]
    assert per["ended"] is True and per["monitored_from_start"] is False
    assert per["complete"] is False
    assert per["monitoring_since"] == "2026-11-16T01:30:00Z"
    for lang, words in (("en", "No monitoring before 2026-11-16 09:30:00 +0800"),
                        ("ru", "Мониторинг не вёлся до 2026-11-16 09:30:00 +0800")):
        assert words in " ".join(parse_page(rr.to_html(nov, lang)).text)
    # a month wholly before the first reading: the same, nothing counted
    assert octo["period"]["complete"] is False and octo["totals"]["accounted_kwh"] == 0.0
    assert "No monitoring before" in rr.to_html(octo, "en")
    # the first full month is complete
    assert dec["period"]["complete"] is True and dec["period"]["monitored_from_start"]
    assert "No monitoring" not in rr.to_html(dec, "en")


def test_a_store_without_readings_says_no_monitoring(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC", meters=IRK_METERS[:1])
    st_ = Store(cfg.storage.path)
    r = rp.build_report(st_, cfg, "2026-01", local(ZoneInfo("UTC"), 2026, 3, 1))
    st_.close()
    assert r["period"]["monitoring_since"] is None and r["period"]["complete"] is False
    assert "No monitoring in this period" in rr.to_html(r, "en")


# --------------------------------------------------------------------------- one run, all formats


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_bundle(out: Path, lang: str = "en") -> str:
    """Every file of a ``--format all`` run shows the one digest; returns it."""
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    digest = doc["sha256"]
    assert rp.content_sha256(doc) == digest  # the JSON is the document
    with (out / "report.csv").open(encoding="utf-8", newline="") as fh:
        meta = {row[0]: row[1] for row in csv.reader(fh) if len(row) == 2}
    assert meta["sha256"] == digest
    other = "ru" if lang == "en" else "en"
    for name, page_lang in (("report.html", lang), (f"report.{other}.html", other)):
        page = (out / name).read_text(encoding="utf-8")
        assert f'<html lang="{page_lang}">' in page and f"<code>{digest}</code>" in page
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sha256"] == digest and manifest["lang"] == lang
    names = [f["name"] for f in manifest["files"]]
    assert names == ["report.json", "report.csv", "report.html", f"report.{other}.html"]
    for f in manifest["files"]:
        assert f["sha256"] == _sha(out / f["name"])
        assert f["bytes"] == (out / f["name"]).stat().st_size
    sums = (out / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    listed = {name: hexd for hexd, name in (line.split("  ", 1) for line in sums)}
    assert set(listed) == {*names, "manifest.json"}
    for name, hexd in listed.items():
        assert re.fullmatch(r"[0-9a-f]{64}", hexd) and hexd == _sha(out / name)
    return str(digest)


def test_format_all_writes_every_format_under_one_digest(
        site: tuple[Store, Config], tmp_path: Path) -> None:
    _, cfg = site
    out = tmp_path / "bundle" / "2026-11"
    err = io.StringIO()
    assert rw.run(cfg, "2026-11", "all", out, now=NOW_IRK, stderr=err) == 0
    digest = check_bundle(out)
    assert digest in err.getvalue() and "SHA256SUMS" in err.getvalue()
    # the same store, configuration and generation time: the same bundle
    again = tmp_path / "again"
    assert rw.run(cfg, "2026-11", "all", again, now=NOW_IRK, lang="ru", stderr=err) == 0
    assert check_bundle(again, "ru") == digest
    assert _sha(out / "report.json") == _sha(again / "report.json")
    assert _sha(out / "report.html") == _sha(again / "report.en.html")


def test_format_all_through_the_cli(site: tuple[Store, Config], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path)  # the store of the `site` fixture
    out = tmp_path / "out"
    assert cli.main(["report", "--config", str(path), "--period", "2026-11",
                     "--format", "all", "--lang", "ru", "--out", str(out)]) == 0
    digest = check_bundle(out, "ru")
    assert digest in capsys.readouterr().err
    assert "Подписи" in (out / "report.html").read_text(encoding="utf-8")
    assert cli.main(["report", "--config", str(path), "--period", "2026-11",
                     "--format", "all"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_format_all_into_an_unwritable_place_fails_cleanly(
        site: tuple[Store, Config], tmp_path: Path) -> None:
    _, cfg = site
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = io.StringIO()
    assert rw.run(cfg, "2026-11", "all", blocker / "sub", now=NOW_IRK, stderr=err) == 1
    assert "cannot write" in err.getvalue()
