"""Configuration: validation before anything connects, dotted keys, includes, secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor import config
from monitor.app.cli import main

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[site]
id = "s1"
timezone = "Asia/Irkutsk"
category = "individual"
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
"""


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as exc:
        load_text(tmp_path, text)
    return exc.value.problems


def test_minimal_config_has_safe_defaults(tmp_path: Path) -> None:
    c = load_text(tmp_path, MINIMAL)
    assert c.client_id == "energy-monitor-s1"
    assert c.mqtt.qos == 1 and c.mqtt.session_expiry_s == 604800
    assert c.actions.mode == "live" and not c.actions.auto_resume


SOURCE = '[[sources]]\ntopic = "tele/+/SENSOR"\nformat = "tasmota"\n'


def doc(site: str = 'id = "s"\ncategory = "individual"\n', rest: str = "",
        source: str = SOURCE) -> str:
    return f"[site]\n{site}{source}{rest}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (doc('id = "S 1"\ncategory = "x"\n'), "site.id: must match"),
        (doc('id = "s"\n'), "site.category: required key is missing"),
        (doc('id = "s"\ncategory = "x"\ntimezone = "Asia/Nowhere"\n'),
         "site.timezone: unknown IANA"),
        (doc('id = "s"\ncategory = "x"\ncolour = "red"\n'), "site.colour: unknown key"),
        (doc(rest="[mqtt]\nport = 70000\n"), "mqtt.port:"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "energy_cap"\n'),
         "rules[0].limit_kwh: required"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "energy_cap"\nlimit_kwh = 5\nwarn_at = [1.5]\n'),
         "rules[0].warn_at: every level must be a fraction"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "teleport"\n'), "rules[0]"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "ban_window"\n'),
         "needs 'dates' or 'yearly'"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "ban_window"\n'
                  'yearly = {start = "02-30", end = "03-01"}\n'),
         "rules[0].yearly.start: 02-30"),
        (doc(rest='[[rules]]\nid = "r"\nkind = "reconcile"\nmain = "site"\nparts = "site"\n'
                  'on_breach = ["alert", "shutdown"]\n'),
         "rules[0].on_breach: a reconcile rule can only 'alert'"),
        (doc(rest='[[webhooks]]\nurl = "ftp://x"\n'), "webhooks[0].url:"),
        (doc(source='[[sources]]\ntopic = "a/#/b"\nformat = "json"\n'), "sources[0].topic"),
        (doc(source='[[sources]]\ntopic = "a"\nformat = "modbus"\n'), "sources[0].format"),
        (doc(source='[[sources]]\ntopic = "a/#"\nformat = "esphome"\n'
                    'options = {power_unit = "MW"}\n'), "sources[0].options: "),
        (doc(source=""), "sources: at least one [[sources]] entry is needed"),
    ],
)
def test_errors_name_the_dotted_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_cross_field_errors(tmp_path: Path) -> None:
    text = MINIMAL + """
[[meters]]
id = "a"
device = "tasmota/x"
group = "g"
[[meters]]
id = "a"
device = "tasmota/x"
[[rules]]
id = "cap"
kind = "energy_cap"
limit_kwh = 10
scope = "group:nope"
"""
    found = problems(tmp_path, text)
    assert "meters[1].id: duplicate meter id 'a'" in found
    assert any(p.startswith("meters[1].device:") for p in found)
    assert "rules[0].scope: no meter is in group 'nope'" in found


def test_include_merges_rules_and_lets_the_site_override(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.toml").write_text(
        '[[rules]]\nid = "cap"\nkind = "energy_cap"\nlimit_kwh = 6000\n'
        '[schedule]\ncheck_interval_s = 30\n')
    c = load_text(tmp_path, 'include = ["profiles/p.toml"]\n' + MINIMAL + """
[[rules]]
id = "ban"
kind = "ban_window"
yearly = {start = "11-15", end = "03-15"}
[schedule]
check_interval_s = 10
""")
    assert [r.id for r in c.rules] == ["cap", "ban"]
    assert c.schedule.check_interval_s == 10


def test_secrets_from_files_and_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    monkeypatch.setenv("MQTT_USER", "monitor")
    c = load_text(tmp_path, MINIMAL + '[mqtt]\nusername = "${MQTT_USER}"\npassword_file = "pw"\n')
    assert c.mqtt.username == "monitor"
    assert c.mqtt.password is not None and c.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(c) and "s3cret" not in c.model_dump_json()
    found = problems(tmp_path, MINIMAL + '[mqtt]\nusername = "${NOPE_UNSET}"\n'
                     'password_file = "missing"\n')
    assert "mqtt.username: environment variable NOPE_UNSET is not set" in found
    assert any(p.startswith("mqtt.password_file: cannot read secret file") for p in found)


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('"s1"', '"S1"') + "[mqtt]\nqos = 5\n")
    assert main(["check-config", "--config", str(bad)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("site.id: ") and err[1].startswith("mqtt.qos: ")
    assert main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 78
    assert main(["no-such-command"]) == 2


def test_python_dash_m_is_the_same_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[site]\n")
    out = subprocess.run([sys.executable, "-m", "monitor", "check-config", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 78
    assert "site.id: required key is missing" in out.stderr


def test_repository_config_and_every_profile_load(tmp_path: Path) -> None:
    c = config.load(ROOT / "config.toml")
    assert c.sources and c.meters and c.rules
    profiles = sorted((ROOT / "deploy" / "profiles").glob("*.toml"))
    assert profiles
    for profile in profiles:
        site = tmp_path / f"{profile.stem}.toml"
        site.write_text(f'include = ["{profile}"]\n' + MINIMAL)
        assert config.load(site).rules, profile


def test_read_only_commands_need_no_secrets(tmp_path: Path) -> None:
    text = MINIMAL + '[mqtt]\nusername = "${UNSET_USER_VAR}"\npassword_file = "/nonexistent/pw"\n'
    with pytest.raises(config.ConfigError):
        load_text(tmp_path, text)
    p = tmp_path / "c.toml"
    c = config.load(p, secrets=False)
    assert c.mqtt.password is None and c.mqtt.username == ""


def test_nested_config_option_is_honoured_in_either_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL + f'[storage]\npath = "{tmp_path / "none.db"}"\n')
    c = str(cfg)
    for argv in (["orders", "--config", c, "list"], ["orders", "list", "--config", c],
                 ["audit", "--config", c, "verify"], ["audit", "verify", "--config", c]):
        assert main(argv) == 1
        assert "none.db" in capsys.readouterr().err, argv
