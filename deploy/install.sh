#!/usr/bin/env bash
# Install energy-monitor on a Debian gateway (docs/operations.md "Installing").
#
#   sudo deploy/install.sh [--with-mosquitto] [--mqtt-password-file FILE] [--now]
#   sudo deploy/install.sh --uninstall [--purge]
#
# What it does (every step is idempotent; run it again to upgrade):
#   /opt/energy-monitor                 a venv with energy-monitor from this checkout
#   /usr/local/bin/energy-monitor       a link to the venv's program (the CLI)
#   /etc/energy-monitor/                config.toml, profiles/ (never overwritten when
#                                       present), config.example.toml (always ours)
#   /etc/energy-monitor/mqtt.cred       the daemon's MQTT password, encrypted with
#                                       systemd-creds (kept when present)
#   /etc/energy-monitor/env             root-only environment for ${ENV} secrets
#   /etc/systemd/system/energy-monitor.service   installed and enabled
#   --with-mosquitto: /etc/mosquitto/conf.d/energy-monitor.conf, the ACL and the
#                     daemon's broker account (files never overwritten when present)
#
# --uninstall stops, disables and removes the unit, the venv and the link, and
# keeps the configuration, the credentials and the store (/var/lib/energy-monitor);
# --purge removes those too.  DESTDIR=/some/root (or --destdir) installs into a
# staging root instead of / and runs nothing on the host (systemctl --root).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
DESTDIR=${DESTDIR:-}
action=install
purge=0
with_mosquitto=0
start_now=0
password_file=""
python=${PYTHON:-python3}
# extra arguments for pip (e.g. --no-index --find-links /srv/wheels on an offline site)
read -r -a pip_args <<<"${ENERGY_MONITOR_PIP_ARGS:-}"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift ;;
    --destdir=*) DESTDIR=${1#*=} ;;
    --source) src=${2:?--source needs a directory}; shift ;;
    --uninstall) action=uninstall ;;
    --purge) purge=1 ;;
    --with-mosquitto) with_mosquitto=1 ;;
    --mqtt-password-file) password_file=${2:?--mqtt-password-file needs a file}; shift ;;
    --now) start_now=1 ;;
    --python) python=${2:?--python needs an interpreter}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[ "$purge" = 1 ] && [ "$action" != uninstall ] && die "--purge goes with --uninstall"
if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
  [ "$DESTDIR" = / ] && DESTDIR=""
fi
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (or give --destdir for a staging root)"
fi

D=$DESTDIR
PREFIX=/opt/energy-monitor
ETC=/etc/energy-monitor
UNIT=/etc/systemd/system/energy-monitor.service
LINK=/usr/local/bin/energy-monitor
MOSQ=/etc/mosquitto
say() { echo "energy-monitor install: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }

systemctl_() {  # systemctl on the host, or offline on the staging root
  if ! have systemctl; then return 1; fi
  if [ -n "$D" ]; then systemctl --root="$D" "$@"; else systemctl "$@"; fi
}

credentials_secret() {  # systemd-creds' host key inside a staging root, not the host's
  if [ -n "$D" ]; then
    mkdir -p "$D/var/lib/systemd"
    export SYSTEMD_CREDENTIAL_SECRET="$D/var/lib/systemd/credential.secret"
  fi
}

# ------------------------------------------------------------------ uninstall
if [ "$action" = uninstall ]; then
  if [ -z "$D" ] && have systemctl; then
    systemctl disable --now energy-monitor.service >/dev/null 2>&1 || true
  elif [ -n "$D" ]; then
    systemctl_ disable energy-monitor.service >/dev/null 2>&1 || true
  fi
  rm -f "$D/etc/systemd/system/multi-user.target.wants/energy-monitor.service"
  rm -f "$D$UNIT"
  rm -rf "$D$UNIT.d"
  if [ -L "$D$LINK" ]; then rm -f "$D$LINK"; fi
  rm -rf "${D:?}$PREFIX"
  [ -z "$D" ] && have systemctl && systemctl daemon-reload || true
  if [ "$purge" = 1 ]; then
    rm -rf "$D$ETC" "$D/var/lib/private/energy-monitor"
    rm -f "$D/var/lib/energy-monitor" 2>/dev/null || rm -rf "$D/var/lib/energy-monitor"
    say "removed, with the configuration, the credentials and the store"
  else
    say "removed; kept $ETC (configuration, credentials) and /var/lib/energy-monitor (the store)"
  fi
  exit 0
fi

# ------------------------------------------------------------------ install
[ -f "$src/pyproject.toml" ] || die "$src is not an energy-monitor checkout"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$python is older than Python 3.11"

# 1. the program, in its own venv
install -d -m 0755 "$D/opt" "$D$PREFIX"
if [ ! -x "$D$PREFIX/bin/python" ]; then
  say "creating the venv $PREFIX"
  "$python" -m venv "$D$PREFIX"
fi
say "installing energy-monitor from $src"
if ! "$D$PREFIX/bin/python" -m pip install -q --disable-pip-version-check \
      ${pip_args[@]+"${pip_args[@]}"} "$src" >"$D$PREFIX/pip.log" 2>&1; then
  cat "$D$PREFIX/pip.log" >&2
  die "pip install failed"
fi
"$D$PREFIX/bin/energy-monitor" --version >/dev/null || die "the installed program does not run"
install -d -m 0755 "$D/usr/local/bin"
ln -sfn "$PREFIX/bin/energy-monitor" "$D$LINK"

# 2. configuration: never overwrite what the operator has
install -d -m 0755 "$D$ETC" "$D$ETC/profiles"
install -m 0644 "$here/config.example.toml" "$D$ETC/config.example.toml"
if [ ! -e "$D$ETC/config.toml" ]; then
  install -m 0644 "$here/config.example.toml" "$D$ETC/config.toml"
  say "wrote $ETC/config.toml from the example: edit it, then check-config"
else
  say "kept $ETC/config.toml"
fi
for profile in "$here"/profiles/*.toml; do
  name=$(basename "$profile")
  [ -e "$D$ETC/profiles/$name" ] || install -m 0644 "$profile" "$D$ETC/profiles/$name"
done
if [ ! -e "$D$ETC/env" ]; then  # ${ENV} secrets (e.g. TELEGRAM_TOKEN=...): root only
  (umask 077 && printf '# KEY=value lines for ${KEY} in config.toml (secrets: root only)\n' \
     >"$D$ETC/env")
fi
chmod 0600 "$D$ETC/env"

# 3. the daemon's MQTT password: a systemd credential
password=""
if [ -n "$password_file" ]; then
  password=$(head -n 1 "$password_file")
  [ -n "$password" ] || die "$password_file is empty"
fi
cred="$D$ETC/mqtt.cred"
generated=0
if [ -n "$password" ] || [ ! -e "$cred" ]; then
  if [ -z "$password" ]; then
    password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 24)
    generated=1
  fi
  if have systemd-creds; then
    credentials_secret
    systemd-creds setup >/dev/null 2>&1 || true
    (umask 077 && printf '%s' "$password" \
       | systemd-creds encrypt --name=mqtt - "$cred.new" 2>/dev/null) \
      || die "systemd-creds encrypt failed"
    mv -f "$cred.new" "$cred"
    chmod 0600 "$cred"
    rm -rf "$D$UNIT.d/credentials.conf"
    say "MQTT password encrypted with systemd-creds into $ETC/mqtt.cred"
  else
    # no systemd-creds: a root-only plain file, loaded with LoadCredential=
    (umask 077 && printf '%s' "$password" >"$D$ETC/mqtt.secret")
    install -d -m 0755 "$D$UNIT.d"
    printf '[Service]\nLoadCredentialEncrypted=\nLoadCredential=mqtt:%s/mqtt.secret\n' "$ETC" \
      >"$D$UNIT.d/credentials.conf"
    chmod 0644 "$D$UNIT.d/credentials.conf"
    say "systemd-creds not found: MQTT password in $ETC/mqtt.secret (mode 0600)"
  fi
else
  say "kept $ETC/mqtt.cred"
fi

# 4. the broker (optional): our conf.d file, the ACL, the daemon's account
if [ "$with_mosquitto" = 1 ]; then
  install -d -m 0755 "$D$MOSQ" "$D$MOSQ/conf.d"
  for f in conf.d/energy-monitor.conf:energy-monitor.conf energy-monitor.acl:energy-monitor.acl; do
    dst=${f%%:*}; from=${f#*:}
    if [ ! -e "$D$MOSQ/$dst" ]; then
      install -m 0644 "$here/mosquitto/$from" "$D$MOSQ/$dst"
    else
      say "kept $MOSQ/$dst"
    fi
  done
  passwd="$D$MOSQ/energy-monitor.passwd"
  if [ -n "$password" ]; then
    have mosquitto_passwd || die "mosquitto_passwd not found (apt-get install mosquitto)"
    [ -e "$passwd" ] || (umask 027 && : >"$passwd")
    mosquitto_passwd -b "$passwd" energy-monitor "$password" >/dev/null 2>&1 \
      || die "mosquitto_passwd failed"
    chmod 0640 "$passwd"
    if [ -z "$D" ] && getent group mosquitto >/dev/null; then chgrp mosquitto "$passwd"; fi
    say "broker account energy-monitor set in $MOSQ/energy-monitor.passwd"
  fi
  if [ -z "$D" ] && have systemctl; then systemctl restart mosquitto || true; fi
elif [ "$generated" = 1 ]; then
  say "generated an MQTT password for the daemon; give the broker account the same:"
  say "  systemd-creds decrypt --name=mqtt $ETC/mqtt.cred - | xargs -r mosquitto_passwd -b /etc/mosquitto/energy-monitor.passwd energy-monitor"
fi
unset password

# 5. the unit, enabled
install -d -m 0755 "$D/etc/systemd/system"
install -m 0644 "$here/systemd/energy-monitor.service" "$D$UNIT"
if systemctl_ enable energy-monitor.service >/dev/null 2>&1; then
  :
else  # no systemctl: what `enable` does for WantedBy=multi-user.target
  install -d -m 0755 "$D/etc/systemd/system/multi-user.target.wants"
  ln -sfn "$UNIT" "$D/etc/systemd/system/multi-user.target.wants/energy-monitor.service"
fi
if [ -z "$D" ] && have systemctl; then
  systemctl daemon-reload
  if [ "$start_now" = 1 ]; then systemctl restart energy-monitor.service; fi
fi
say "done: $("$D$PREFIX/bin/energy-monitor" --version), unit enabled"
[ "$start_now" = 1 ] || say "next: edit $ETC/config.toml, check-config, systemctl start energy-monitor"
