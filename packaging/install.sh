#!/bin/sh
# Install (or upgrade) ccproxy on a host, as root:
#
#   sh packaging/install.sh [SOURCE]      # SOURCE: a checkout (default: this one), an sdist or a wheel
#
# - a virtual environment in /opt/ccproxy: Debian 12 and later refuse `pip install` into the system
#   Python (PEP 668, "externally managed environment"); /opt is where the FHS puts add-on software
#   that keeps to one directory, so an upgrade replaces one tree and removes nothing else, and the
#   unit's ProtectSystem=strict keeps it read-only for the daemon;
# - Twisted's plugin cache (dropin.cache) built as root, now and after every upgrade: the service
#   user cannot write into the venv, and would otherwise log "Unable to write to plugin cache" at
#   every start;
# - the `ccproxy` system user and group (no login, no home of its own beyond /var/lib/ccproxy);
# - /etc/ccproxy root:ccproxy 0750, config.yaml and ccproxy.env root:ccproxy 0640 (the daemon reads
#   them, only root changes them), written from the examples only when absent: an upgrade keeps yours;
# - for the example config, its development certificate (loopback only) made now, as root, into
#   /etc/ccproxy/tls: the daemon could not write it there itself;
# - /var/lib/ccproxy and /var/log/ccproxy owned by the service user, mode 0750 (systemd also makes
#   them, from StateDirectory= and LogsDirectory=);
# - the systemd unit in /etc/systemd/system, with the paths above; then `check-config` as the
#   service user, which proves the config can be acted on with that user's rights.
#
# Paths can be changed with CCPROXY_PREFIX, CCPROXY_CONFDIR, CCPROXY_UNITDIR, CCPROXY_STATEDIR,
# CCPROXY_LOGDIR, CCPROXY_USER and PYTHON (the interpreter the venv is made from, 3.11 or later).
# CCPROXY_VENV_ARGS and CCPROXY_PIP_ARGS are passed to `python -m venv` and `pip install` (for an
# offline install from a wheelhouse: CCPROXY_PIP_ARGS="--no-index --find-links /path/to/wheels").
set -eu

here=$(cd "$(dirname "$0")" && pwd)
SOURCE=${1:-$(dirname "$here")}
PREFIX=${CCPROXY_PREFIX:-/opt/ccproxy}
CONFDIR=${CCPROXY_CONFDIR:-/etc/ccproxy}
UNITDIR=${CCPROXY_UNITDIR:-/etc/systemd/system}
STATEDIR=${CCPROXY_STATEDIR:-/var/lib/ccproxy}
LOGDIR=${CCPROXY_LOGDIR:-/var/log/ccproxy}
SERVICE_USER=${CCPROXY_USER:-ccproxy}
PYTHON=${PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and writes to $PREFIX and $CONFDIR)"
[ -e "$SOURCE" ] || die "no such source: $SOURCE"

# 1. The venv and the package.
if [ ! -x "$PREFIX/bin/python" ]; then
    say "creating the virtual environment $PREFIX"
    # shellcheck disable=SC2086  # word splitting of the extra arguments is wanted
    "$PYTHON" -m venv ${CCPROXY_VENV_ARGS:-} "$PREFIX" || die "python -m venv failed (Debian: apt-get install python3-venv)"
fi
say "installing $SOURCE into $PREFIX"
# The dependencies at the versions CI tested and audited (packaging/requirements.lock), when at hand.
lock=""
[ -f "$here/requirements.lock" ] && lock="$here/requirements.lock"
# shellcheck disable=SC2086
"$PREFIX/bin/python" -m pip install --quiet --upgrade ${lock:+-c "$lock"} ${CCPROXY_PIP_ARGS:-} "$SOURCE"

# 2. Twisted's plugin cache, written while we are root. Run from / so that a source tree in the
# current directory (a checkout) is not on the path: the installed plugin folder is the one to build.
(cd / && "$PREFIX/bin/python" - <<'EOF'
import os
from twisted.plugin import IPlugin, getPlugins
import twisted.plugins

names = [p.tapname for p in getPlugins(IPlugin) if hasattr(p, "tapname")]
assert "ccproxy" in names, f"twistd plugin not found: {names}"
for folder in twisted.plugins.__path__:
    if os.path.exists(os.path.join(folder, "ccproxy_plugin.py")):
        assert os.path.exists(os.path.join(folder, "dropin.cache")), folder
EOF
)
say "plugin cache built"

# 3. The service user.
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    say "creating the system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATEDIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "ccproxy daemon" "$SERVICE_USER"
fi
group=$(id -gn "$SERVICE_USER")

# 4. Directories.
install -d -m 0750 -o root -g "$group" "$CONFDIR"
install -d -m 0750 -o "$SERVICE_USER" -g "$group" "$STATEDIR" "$LOGDIR"

# 5. Config, environment file, development certificate: only when absent.
if [ ! -e "$CONFDIR/config.yaml" ]; then
    tmp=$(mktemp)
    "$PREFIX/bin/ccproxy" example config --force -o "$tmp" >/dev/null
    install -m 0640 -o root -g "$group" "$tmp" "$CONFDIR/config.yaml"
    rm -f "$tmp"
    say "wrote $CONFDIR/config.yaml (the example: loopback only, a self-signed certificate)"
    if [ ! -e "$CONFDIR/tls/cert.pem" ]; then
        install -d -m 0750 -o root -g "$group" "$CONFDIR/tls"
        "$PREFIX/bin/ccproxy" gen-cert --cert "$CONFDIR/tls/cert.pem" --key "$CONFDIR/tls/key.pem" >/dev/null
        chown root:"$group" "$CONFDIR/tls/cert.pem" "$CONFDIR/tls/key.pem"
        chmod 0644 "$CONFDIR/tls/cert.pem"
        chmod 0640 "$CONFDIR/tls/key.pem"
        say "wrote the development certificate $CONFDIR/tls/cert.pem"
    fi
fi
if [ ! -e "$CONFDIR/ccproxy.env" ]; then
    printf '%s\n' "# Read by the systemd unit: upstream keys and the variables the config names." \
        "# ANTHROPIC_API_KEY=..." "# OPENAI_API_KEY=..." "# CCPROXY_AUDIT_HMAC_KEY=..." > "$CONFDIR/ccproxy.env"
    chown root:"$group" "$CONFDIR/ccproxy.env"
    chmod 0640 "$CONFDIR/ccproxy.env"
fi

# 6. The unit, its paths matching this install.
install -d -m 0755 "$UNITDIR"
"$PREFIX/bin/ccproxy" example unit \
    | sed -e "s#/opt/ccproxy#$PREFIX#g" -e "s#/etc/ccproxy#$CONFDIR#g" -e "s#^User=ccproxy#User=$SERVICE_USER#" \
          -e "s#^Group=ccproxy#Group=$group#" > "$UNITDIR/ccproxy.service.new"
chmod 0644 "$UNITDIR/ccproxy.service.new"
mv "$UNITDIR/ccproxy.service.new" "$UNITDIR/ccproxy.service"
say "wrote $UNITDIR/ccproxy.service"

# 7. The config checked with the service user's rights, as the unit's ExecStartPre will.
if command -v runuser >/dev/null; then
    as_user() { runuser -u "$SERVICE_USER" -- "$@"; }
else
    as_user() { setpriv --reuid "$SERVICE_USER" --regid "$group" --clear-groups -- "$@"; }
fi
if ! as_user "$PREFIX/bin/ccproxy" check-config "$CONFDIR/config.yaml" --quiet; then
    die "$CONFDIR/config.yaml cannot be used by $SERVICE_USER as it is: fix what is named above"
fi

if [ -d /run/systemd/system ] && [ "$UNITDIR" = /etc/systemd/system ]; then
    systemctl daemon-reload
    say "installed. Start it with: systemctl enable --now ccproxy (after an upgrade: systemctl restart ccproxy)"
else
    say "installed."
fi
