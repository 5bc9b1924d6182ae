#!/usr/bin/env bash
# Install the deeplens-dashboard bundle this script sits in: offline, into a fresh venv of the
# device's Python, with a systemd service. Written for bash 4.3 (Ubuntu 16.04, the DeepLens).
set -eu

PROG=install.sh
UNIT_NAME=deeplens-dashboard.service
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
HERE=$(cd "$(dirname "$0")" && pwd)

DIED=0
die() {
  echo "$PROG: error: $*" >&2
  DIED=1
  exit 1
}

usage_error() {
  echo "$PROG: error: $*" >&2
  echo "Try '$0 --help'." >&2
  exit 2
}

target_value() {
  sed -n "s/^$1=//p" "$HERE/TARGET" | head -n 1
}

[ -f "$HERE/TARGET" ] || die "$HERE/TARGET is missing: run install.sh from an unpacked bundle"
TARGET_PYTHON=$(target_value python)
TARGET_PLATFORM=$(target_value platform)
TARGET_MACHINE=$(target_value machine)
TARGET_GLIBC=$(target_value glibc)
VERSION=$(target_value version)

PYTHON=
PREFIX=/opt/deeplens-dashboard
CONFIG_DIR=/etc/deeplens-dashboard
SERVICE=1
PRINT_UNIT=0

usage() {
  cat <<EOF
Usage: sudo $0 [--python PATH] [--prefix DIR] [--config-dir DIR] [--no-service]

Installs deeplens-dashboard $VERSION from this bundle, with no network: a fresh venv
PREFIX/venv of the device's Python $TARGET_PYTHON (it sees the system's packages too, such as
awscam and mo), the example config if there is no config yet, and a systemd service.
Run it again to upgrade: the venv is rebuilt, the config is kept.

Options:
  --python PATH      the Python $TARGET_PYTHON to use (default: python$TARGET_PYTHON on PATH, then
                     /usr/bin/python$TARGET_PYTHON, /usr/local/bin/python$TARGET_PYTHON)
  --prefix DIR       where the venv goes (default: /opt/deeplens-dashboard)
  --config-dir DIR   where config.toml and the environment file live
                     (default: /etc/deeplens-dashboard)
  --no-service       do not install or start the systemd service
  --print-unit       print the systemd unit it would write, and exit
  -h, --help         show this help and exit
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --python|--prefix|--config-dir)
      if [ $# -lt 2 ] || [ -z "$2" ]; then
        usage_error "$1 needs a value"
      fi
      case "$1" in
        --python) PYTHON=$2 ;;
        --prefix) PREFIX=$2 ;;
        --config-dir) CONFIG_DIR=$2 ;;
      esac
      shift 2
      ;;
    --python=*) PYTHON=${1#*=}; shift ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --config-dir=*) CONFIG_DIR=${1#*=}; shift ;;
    --no-service) SERVICE=0; shift ;;
    --print-unit) PRINT_UNIT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown option: $1" ;;
  esac
done

absolute() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$(pwd)" "$1" ;;
  esac
}
PREFIX=$(absolute "$PREFIX")
CONFIG_DIR=$(absolute "$CONFIG_DIR")
CONFIG=$CONFIG_DIR/config.toml
VENV=$PREFIX/venv

sed_escape() {
  printf '%s' "$1" | sed 's/[\\|&]/\\&/g'
}

render_unit() {
  case "$PREFIX$CONFIG_DIR" in
    *[[:space:]]*) die "systemd cannot run from a path with spaces: $PREFIX, $CONFIG_DIR" ;;
  esac
  sed -e "s|@PREFIX@|$(sed_escape "$PREFIX")|g" \
      -e "s|@CONFIG_DIR@|$(sed_escape "$CONFIG_DIR")|g" \
      -e "s|@CONFIG@|$(sed_escape "$CONFIG")|g" \
      "$HERE/deeplens-dashboard.service"
}

if [ "$PRINT_UNIT" = 1 ]; then
  render_unit
  exit 0
fi

STEP="starting"
on_exit() {
  status=$?
  if [ "$status" != 0 ] && [ "$DIED" = 0 ]; then
    echo "$PROG: failed while $STEP (exit $status); nothing after that step was done" >&2
    if [ "$(id -u)" != 0 ]; then
      echo "$PROG: not running as root: the default places need sudo ./install.sh" >&2
    fi
  fi
}
trap on_exit EXIT

# -- the interpreter ------------------------------------------------------------------------------
STEP="looking for Python $TARGET_PYTHON"
if [ -z "$PYTHON" ]; then
  for candidate in "python$TARGET_PYTHON" "/usr/bin/python$TARGET_PYTHON" \
                   "/usr/local/bin/python$TARGET_PYTHON"; do
    if command -v "$candidate" >/dev/null 2>&1; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
  [ -n "$PYTHON" ] || die "no python$TARGET_PYTHON found (this bundle is for CPython $TARGET_PYTHON): \
install it, or pass --python PATH"
fi
case "$PYTHON" in
  */*) PYTHON=$(absolute "$PYTHON") ;;
  *) PYTHON=$(command -v "$PYTHON") || die "--python $PYTHON: not found" ;;
esac
[ -x "$PYTHON" ] || die "--python $PYTHON: not an executable file"

STEP="checking $PYTHON"
# One line: version, implementation, machine, glibc version ("" when not glibc).
FACTS=$("$PYTHON" -c 'import os, platform, sys
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION")
except (AttributeError, ValueError, OSError):  # not glibc
    libc = ""
print("%d.%d %s %s %s" % (sys.version_info[0], sys.version_info[1],
      platform.python_implementation(), platform.machine(), (libc or "x 0.0").split()[-1]))') \
  || die "$PYTHON does not run"
read -r HAVE_PYTHON HAVE_IMPL HAVE_MACHINE HAVE_GLIBC <<<"$FACTS"
if [ "$HAVE_PYTHON" != "$TARGET_PYTHON" ] || [ "$HAVE_IMPL" != CPython ]; then
  die "$PYTHON is $HAVE_IMPL $HAVE_PYTHON, but this bundle's wheels are built for CPython \
$TARGET_PYTHON: pass --python with a Python $TARGET_PYTHON, or build a bundle for this one \
(deeplens-dashboard package-device --python-version $HAVE_PYTHON)"
fi
if [ -n "$TARGET_MACHINE" ] && [ "$HAVE_MACHINE" != "$TARGET_MACHINE" ]; then
  die "this machine is $HAVE_MACHINE, but the bundle is for $TARGET_PLATFORM ($TARGET_MACHINE)"
fi
if [ -n "$TARGET_GLIBC" ]; then
  need_major=${TARGET_GLIBC%%.*} need_minor=${TARGET_GLIBC#*.}
  have_major=${HAVE_GLIBC%%.*} have_minor=${HAVE_GLIBC#*.}
  have_minor=${have_minor%%[!0-9]*}
  if [ "$have_major" -lt "$need_major" ] \
     || { [ "$have_major" -eq "$need_major" ] && [ "${have_minor:-0}" -lt "$need_minor" ]; }; then
    die "this system's glibc is $HAVE_GLIBC, but the bundle ($TARGET_PLATFORM) needs $TARGET_GLIBC or newer"
  fi
fi
"$PYTHON" -c 'import venv' 2>/dev/null \
  || die "$PYTHON has no venv module (Ubuntu: apt-get install python$TARGET_PYTHON-venv)"

STEP="checking the bundle"
PIP_WHEELS=$(ls "$HERE"/wheels/pip-*.whl 2>/dev/null || true)
if [ -z "$PIP_WHEELS" ] || [ "$(printf '%s\n' "$PIP_WHEELS" | wc -l)" != 1 ]; then
  die "the bundle must hold exactly one pip wheel in $HERE/wheels"
fi
PIP_WHEEL=$PIP_WHEELS
ls "$HERE"/wheels/deeplens_dashboard-*.whl >/dev/null 2>&1 \
  || die "the bundle holds no deeplens-dashboard wheel in $HERE/wheels"

HAVE_SYSTEMD=0
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  HAVE_SYSTEMD=1
fi
if [ "$SERVICE" = 1 ] && [ "$HAVE_SYSTEMD" = 1 ]; then
  case "$(systemctl is-active "$UNIT_NAME" 2>/dev/null || true)" in
    active|activating|reloading)
      # The running service imports from the venv about to be rebuilt: stop it first.
      STEP="stopping the running $UNIT_NAME"
      systemctl stop "$UNIT_NAME"
      ;;
  esac
fi

# -- the venv -------------------------------------------------------------------------------------
STEP="creating the venv $VENV"
mkdir -p "$PREFIX"
# --system-site-packages: the device's awscam, mo and greengrasssdk stay importable.
# --clear: an upgrade starts from nothing. --without-pip: the device's Python may lack ensurepip.
"$PYTHON" -m venv --system-site-packages --clear --without-pip "$VENV"

STEP="installing the wheels into $VENV"
# Only this bundle counts: the owner's pip settings (an index, a proxy, constraints) do not apply
# offline, and PYTHONPATH must not put other copies before the venv's.
for var in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*$/\1/p'); do
  unset "$var"
done
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONNOUSERSITE=1
# --ignore-installed: the system's packages never stand in for the bundle's.
"$VENV/bin/python" "$PIP_WHEEL/pip" install --no-index --find-links "$HERE/wheels" \
  --ignore-installed --no-warn-script-location pip deeplens-dashboard

STEP="checking the installed deeplens-dashboard"
"$VENV/bin/deeplens-dashboard" --help >/dev/null \
  || die "deeplens-dashboard is installed in $VENV but does not start (see above)"

# -- the config -----------------------------------------------------------------------------------
STEP="installing the config in $CONFIG_DIR"
mkdir -p "$CONFIG_DIR"
cp "$HERE/config.example.toml" "$CONFIG_DIR/config.example.toml"
chmod 0644 "$CONFIG_DIR/config.example.toml"
if [ -e "$CONFIG" ]; then
  CONFIG_NOTE="kept (yours); the options of this version: $CONFIG_DIR/config.example.toml"
else
  cp "$HERE/config.example.toml" "$CONFIG"
  chmod 0644 "$CONFIG"
  CONFIG_NOTE="new, from the example: edit it"
fi
PORT=$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*$/\1/p' "$CONFIG" | head -n 1)
PORT=${PORT:-8080}

# -- the service ----------------------------------------------------------------------------------
SERVICE_NOTE="not installed (--no-service)"
STARTED=0
if [ "$SERVICE" = 1 ]; then
  if [ "$HAVE_SYSTEMD" = 1 ]; then
    STEP="installing $UNIT_PATH"
    render_unit >"$UNIT_PATH.tmp"
    chmod 0644 "$UNIT_PATH.tmp"
    mv -f "$UNIT_PATH.tmp" "$UNIT_PATH"
    STEP="starting $UNIT_NAME"
    systemctl daemon-reload
    systemctl enable "$UNIT_NAME"
    # restart, not start: it also replaces an instance started meanwhile (Restart=always).
    systemctl restart "$UNIT_NAME"
    SERVICE_NOTE="running: systemctl status deeplens-dashboard"
    STARTED=1
  else
    SERVICE_NOTE="not installed: systemd is not running here"
  fi
fi

STEP="done"
ADDRESS=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
cat <<EOF

deeplens-dashboard $VERSION installed in $VENV (CPython $HAVE_PYTHON)
  config:  $CONFIG ($CONFIG_NOTE)
  service: $SERVICE_NOTE
EOF
if [ "$STARTED" = 1 ]; then
  cat <<EOF

Next:
  open      http://${ADDRESS:-<device-ip>}:$PORT/
  logs      journalctl -u deeplens-dashboard -f   (the control token is logged at start)
  settings  sudo nano $CONFIG
            then: sudo systemctl restart deeplens-dashboard
  secrets   KEY=value lines in $CONFIG_DIR/environment (DEEPLENS_MQTT_PASSWORD=..., DEEPLENS_TOKEN=...,
            LD_LIBRARY_PATH=...), then restart
EOF
else
  cat <<EOF

Next:
  run       $VENV/bin/deeplens-dashboard --config $CONFIG
  open      http://${ADDRESS:-<device-ip>}:$PORT/
  settings  edit $CONFIG (or DEEPLENS_<OPTION> environment variables)
EOF
fi
