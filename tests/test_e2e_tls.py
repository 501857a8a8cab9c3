"""The daemon on a broker that demands TLS and a password (as a real site's should)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.daemon import Daemon, query, wait_for
from tests.servers import free_port, mosquitto_user_line, wait_port


def _certs(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                  "srv.pem"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
        "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


@pytest.mark.slow
def test_tls_and_password_from_a_file(tmp_path: Path) -> None:
    ca, cert, key = _certs(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "monitor", "s3cret"],
                   check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "meter", "m3ter"], check=True,
                   capture_output=True)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {passwd}\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                    f"persistence false\nlog_dest none\n{mosquitto_user_line()}\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)])
    try:
        wait_port(port, proc=broker)
        (tmp_path / "mqtt-password").write_text("s3cret\n")
        cfg = tmp_path / "d.toml"
        cfg.write_text(f"""
[site]
id = "tls"
category = "legal_entity"
[mqtt]
host = "127.0.0.1"
port = {port}
username = "monitor"
password_file = "mqtt-password"
tls = {{ ca_file = "{ca}" }}
[storage]
path = "{tmp_path / 'monitor.db'}"
[http]
enabled = false
[[sources]]
topic = "m/#"
format = "json"
""")
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: query(cfg, "SELECT 1 FROM schema_migrations"), 30)
            time.sleep(1.5)
            pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
            pub.username_pw_set("meter", "m3ter")
            pub.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
            pub.connect("127.0.0.1", port)
            pub.loop_start()
            for i in range(5):
                body = {"meter": "a", "ts": time.time() - 50 + i * 10, "energy_kwh": i * 0.1}
                pub.publish("m/a", json.dumps(body), qos=1).wait_for_publish(10)
            wait_for(lambda: query(cfg, "SELECT count(*) FROM readings")[0][0] == 5, 30,
                     what="readings over TLS")
            assert query(cfg, "SELECT sum(mwh) / 1e6 FROM ledger")[0][0] == pytest.approx(0.4)
            pub.disconnect()
            pub.loop_stop()
            assert daemon.stop() == 0
            assert "s3cret" not in (tmp_path / "daemon.log").read_text()
        finally:
            daemon.kill()
    finally:
        broker.terminate()
        broker.wait(10)
