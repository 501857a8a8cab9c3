"""deploy/install.sh into a throw-away root (DESTDIR): files, modes, the unit, the
credential, idempotence, and --uninstall / --purge.

The venv is created from this checkout (pip may take the dependencies from its
cache); nothing is run on the host: systemctl works offline on the root
(``--root``), and systemd-creds uses a host key inside the root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.daemon import ROOT
from tests.test_systemd import MAX_EXPOSURE, exposure, verify

INSTALL = ROOT / "deploy/install.sh"
PASSWORD = "s3cret-mqtt-pw"


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("DESTDIR", None)
    res = subprocess.run(["bash", str(INSTALL), "--destdir", str(root), *args],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def digest_tree(root: Path) -> dict[str, str]:
    """Every file outside the venv's libraries, by content (links by target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith(("opt/energy-monitor/lib", "opt/energy-monitor/bin",
                           "opt/energy-monitor/pip.log")):
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = f"{mode(p):o} " + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def decrypt(root: Path, cred: Path) -> str:
    env = {**os.environ,
           "SYSTEMD_CREDENTIAL_SECRET": str(root / "var/lib/systemd/credential.secret")}
    res = subprocess.run(["systemd-creds", "decrypt", "--name=mqtt", str(cred), "-"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return res.stdout


@pytest.mark.slow
def test_install_reinstall_uninstall_purge(tmp_path: Path) -> None:
    if shutil.which("systemd-creds") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("systemd-creds / mosquitto_passwd missing: run scripts/install-deps")
    root = tmp_path / "root"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    run(root, "--with-mosquitto", "--mqtt-password-file", str(pw))

    etc = root / "etc/energy-monitor"
    unit = root / "etc/systemd/system/energy-monitor.service"
    program = root / "opt/energy-monitor/bin/energy-monitor"
    expected_modes = {
        etc: 0o755, etc / "config.toml": 0o644, etc / "config.example.toml": 0o644,
        etc / "profiles/ru-2024.toml": 0o644, etc / "env": 0o600, etc / "mqtt.cred": 0o600,
        unit: 0o644, root / "opt/energy-monitor": 0o755,
        root / "etc/mosquitto/conf.d/energy-monitor.conf": 0o644,
        root / "etc/mosquitto/energy-monitor.acl": 0o644,
        root / "etc/mosquitto/energy-monitor.passwd": 0o640,
    }
    for path, m in expected_modes.items():
        assert mode(path) == m, (path, oct(mode(path)))
        assert path.stat().st_uid == os.geteuid()
    # the unit, as shipped, enabled for multi-user.target
    assert unit.read_bytes() == (ROOT / "deploy/systemd/energy-monitor.service").read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/energy-monitor.service"
    assert os.readlink(wants) == "/etc/systemd/system/energy-monitor.service"
    assert os.readlink(root / "usr/local/bin/energy-monitor") == \
        "/opt/energy-monitor/bin/energy-monitor"
    assert "ExecStart=/opt/energy-monitor/bin/energy-monitor run" in unit.read_text()
    res = verify(unit.read_text(), program, tmp_path)
    assert res.returncode == 0, res.stderr
    assert exposure(unit) <= MAX_EXPOSURE
    # the program runs from the venv, and the starting config is valid with the credential
    out = subprocess.run([str(program), "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.startswith("energy-monitor ")
    assert decrypt(root, etc / "mqtt.cred") == PASSWORD
    assert PASSWORD.encode() not in (etc / "mqtt.cred").read_bytes()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt").write_text(decrypt(root, etc / "mqtt.cred"))
    check = subprocess.run([str(program), "check-config", "--config", str(etc / "config.toml")],
                           capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    assert check.returncode == 0, check.stdout + check.stderr
    passwd = (root / "etc/mosquitto/energy-monitor.passwd").read_text()
    assert passwd.startswith("energy-monitor:$") and PASSWORD not in passwd

    # idempotent: a second run changes nothing, and never overwrites the operator's files
    (etc / "config.toml").write_text("# the operator's own\n")
    (etc / "profiles/ru-2024.toml").write_text("# edited\n")
    (root / "etc/mosquitto/energy-monitor.acl").write_text("# site ACL\n")
    before = digest_tree(root)
    second = run(root, "--with-mosquitto")
    assert digest_tree(root) == before
    assert "kept /etc/energy-monitor/config.toml" in second.stdout
    assert decrypt(root, etc / "mqtt.cred") == PASSWORD

    # --uninstall keeps configuration, credentials and the store
    store = root / "var/lib/private/energy-monitor"
    store.mkdir(parents=True)
    (store / "monitor.db").write_bytes(b"ledger")
    (root / "var/lib/energy-monitor").symlink_to("private/energy-monitor")
    run(root, "--uninstall")
    for gone in (root / "opt/energy-monitor", unit, wants, root / "usr/local/bin/energy-monitor"):
        assert not gone.exists() and not gone.is_symlink(), gone
    assert (etc / "config.toml").read_text() == "# the operator's own\n"
    assert decrypt(root, etc / "mqtt.cred") == PASSWORD
    assert (root / "var/lib/energy-monitor/monitor.db").read_bytes() == b"ledger"

    # --uninstall --purge removes them too
    run(root, "--uninstall", "--purge")
    assert not etc.exists()
    assert not store.exists() and not (root / "var/lib/energy-monitor").is_symlink()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for args in (["--purge"], ["--bogus"]):
        res = subprocess.run(["bash", str(INSTALL), "--destdir", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode != 0
        assert "install.sh:" in res.stderr
    assert list(tmp_path.iterdir()) == []
