"""deploy/profiles/ru-2024.toml, loaded through monitor.config the way a site includes it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from monitor import config
from monitor.config import Config
from monitor.rules.evaluate import Snapshot, applies, evaluate_all

PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles" / "ru-2024.toml"

CAP = "ru-individual-monthly-cap"
FULL = "ru-ban-full-2025-2031"
SEASONAL = "ru-ban-seasonal-siberia"
SOUTH = "ru-ban-irkutsk-south-year-round"


def load_site(tmp_path: Path, *, region: str, subregion: str = "",
              category: str = "individual", off_grid: bool = False,
              relative: bool = False) -> Config:
    include = PROFILE
    if relative:
        include = Path("profiles") / PROFILE.name
        (tmp_path / "profiles").mkdir(exist_ok=True)
        (tmp_path / include).write_text(PROFILE.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "site.toml").write_text(f"""\
include = ["{include.as_posix()}"]

[site]
id = "site-1"
timezone = "Asia/Irkutsk"
region = "{region}"
subregion = "{subregion}"
category = "{category}"
off_grid = {str(off_grid).lower()}

[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
""", encoding="utf-8")
    return config.load(tmp_path / "site.toml")


def applying(cfg: Config, day: str) -> set[str]:
    d = dt.date.fromisoformat(day)
    return {r.id for r in cfg.rules if applies(r, cfg.site, d)}


def bans(cfg: Config, day: str) -> dict[str, str]:
    """The state of every ban rule at local noon of ``day``."""
    d = dt.date.fromisoformat(day)
    now = dt.datetime(d.year, d.month, d.day, 12, tzinfo=ZoneInfo(cfg.site.timezone)).timestamp()
    snap = Snapshot(now=now, site=cfg.site, meters={}, period_kwh={"calendar_month": {}},
                    period_gap_kwh={}, window_kwh={3600.0: {}})
    return {v.rule: v.state for v in evaluate_all(cfg.rules, snap) if v.kind == "ban_window"}


def test_profile_loads_and_every_rule_cites_its_source(tmp_path: Path) -> None:
    cfg = load_site(tmp_path, region="RU-IRK", subregion="angarsk", relative=True)
    ids = [r.id for r in cfg.rules]
    assert ids == [CAP, FULL, SEASONAL, SOUTH]
    assert all(r.source for r in cfg.rules)
    cap = cfg.rules[0]
    assert cap.kind == "energy_cap"
    assert (cap.limit_kwh, cap.period, cap.warn_at) == (6000, "calendar_month", [0.8, 0.95])
    assert cap.on_breach == ["alert", "shutdown"]
    assert all(r.exempt_off_grid for r in cfg.rules if r.kind == "ban_window")


@pytest.mark.parametrize(
    ("region", "subregion", "category", "day", "expected"),
    [
        # Angarsk: seasonal and year-round (in effect; the ban verdicts say whether in a window)
        ("RU-IRK", "angarsk", "individual", "2026-01-10", {CAP, SEASONAL, SOUTH}),
        ("RU-IRK", "angarsk", "individual", "2026-07-01", {CAP, SEASONAL, SOUTH}),
        ("RU-IRK", "angarsk", "individual", "2031-03-16", {CAP}),
        ("RU-IRK", "angarsk", "legal_entity", "2026-07-01", {SEASONAL, SOUTH}),
        # before the year-round ban began
        ("RU-IRK", "angarsk", "legal_entity", "2025-04-06", {SEASONAL}),
        # the north of the oblast: seasonal only
        ("RU-IRK", "bratsk", "legal_entity", "2026-01-10", {SEASONAL}),
        ("RU-IRK", "", "legal_entity", "2026-07-01", {SEASONAL}),
        # North Caucasus: full ban
        ("RU-DA", "", "individual", "2026-01-10", {CAP, FULL}),
        ("RU-DA", "", "legal_entity", "2026-07-01", {FULL}),
        ("RU-DA", "", "legal_entity", "2031-03-16", set()),
        ("RU-DPR", "", "legal_entity", "2026-07-01", {FULL}),
        # Moscow: only the individual cap
        ("RU-MOW", "", "individual", "2026-01-10", {CAP}),
        ("RU-MOW", "", "legal_entity", "2026-01-10", set()),
        ("RU-MOW", "", "individual", "2024-10-31", set()),
    ],
)
def test_which_rules_apply(tmp_path: Path, region: str, subregion: str, category: str,
                           day: str, expected: set[str]) -> None:
    cfg = load_site(tmp_path, region=region, subregion=subregion, category=category)
    assert applying(cfg, day) == expected


def test_irkutsk_bans_through_the_year(tmp_path: Path) -> None:
    angarsk = load_site(tmp_path, region="RU-IRK", subregion="angarsk", category="legal_entity")
    assert bans(angarsk, "2026-01-10") == {SEASONAL: "breach", SOUTH: "breach"}
    assert bans(angarsk, "2026-07-01") == {SEASONAL: "ok", SOUTH: "breach"}
    assert bans(angarsk, "2026-11-10") == {SEASONAL: "warning", SOUTH: "breach"}
    assert bans(angarsk, "2031-03-16") == {SEASONAL: "ok", SOUTH: "ok"}
    bratsk = load_site(tmp_path, region="RU-IRK", subregion="bratsk", category="legal_entity")
    assert bans(bratsk, "2026-01-10") == {SEASONAL: "breach"}
    assert bans(bratsk, "2026-07-01") == {SEASONAL: "ok"}
    assert bans(bratsk, "2025-02-01") == {SEASONAL: "breach"}  # the first window


def test_off_grid_sites_are_exempt_from_bans(tmp_path: Path) -> None:
    cfg = load_site(tmp_path, region="RU-DA", off_grid=True)
    assert applying(cfg, "2026-07-01") == {CAP}
    assert bans(cfg, "2026-07-01") == {}


def test_full_ban_verdict_says_until_when(tmp_path: Path) -> None:
    cfg = load_site(tmp_path, region="RU-CE", category="legal_entity")
    d = dt.datetime(2026, 1, 10, 12, tzinfo=ZoneInfo("Asia/Irkutsk")).timestamp()
    snap = Snapshot(now=d, site=cfg.site, meters={}, period_kwh={}, period_gap_kwh={},
                    window_kwh={})
    (v,) = evaluate_all(cfg.rules, snap)
    assert v.state == "breach"
    assert "until 2031-03-15 inclusive" in v.message
