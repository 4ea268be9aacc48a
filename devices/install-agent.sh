#!/bin/sh
# Put edgectl-agent on a board as a systemd service, in one step:
#
#   sudo sh install-agent.sh --device-id pi-kitchen-1 --broker mqtt://fleet-host.local:1883 \
#        [--profile raspberry-pi-4] [--group lab] [--runtime litert|tflite] [--from PIP_SPEC]
#        [--trusted-key edgectl-signing.pub] [--password-file pi-kitchen-1.password]
#
# --trusted-key: install only bundles signed with this key (copied to /etc/edgectl/keys/);
# --password-file: the broker password from `edgectl devices enroll` (copied to
# /etc/edgectl/password, mode 0600; the username is the device id).
#
# Creates /opt/edgectl (a venv with edgectl[agent] or edgectl[agent-tflite]: numpy, paho-mqtt and
# one TFLite runtime), writes /etc/edgectl/agent.toml (kept if it exists), installs the systemd
# unit and starts it. Re-running upgrades the package and restarts the service.
set -eu

DEVICE_ID=""; BROKER=""; PROFILE="raspberry-pi-4"; GROUP="default"; RUNTIME="litert"; FROM="edgectl"
TRUSTED_KEY=""; PASSWORD_FILE=""
PREFIX=/opt/edgectl; CONF_DIR=/etc/edgectl; UNIT_DIR=/etc/systemd/system
while [ $# -gt 0 ]; do
    case "$1" in
        --device-id) DEVICE_ID="$2"; shift 2 ;;
        --broker) BROKER="$2"; shift 2 ;;
        --profile) PROFILE="$2"; shift 2 ;;
        --group) GROUP="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --from) FROM="$2"; shift 2 ;;
        --trusted-key) TRUSTED_KEY="$2"; shift 2 ;;
        --password-file) PASSWORD_FILE="$2"; shift 2 ;;
        *) echo "install-agent.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$DEVICE_ID" ] && [ -n "$BROKER" ] || { echo "install-agent.sh: --device-id and --broker are required" >&2; exit 2; }
case "$RUNTIME" in
    litert) EXTRA=agent ;;
    tflite) EXTRA=agent-tflite ;;   # tflite-runtime 2.14: Python <= 3.11
    *) echo "install-agent.sh: --runtime must be litert or tflite" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "install-agent.sh: run it as root (sudo)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "install-agent.sh: python3 (>= 3.11) is needed" >&2; exit 1; }

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade "$FROM[$EXTRA]"
mkdir -p "$CONF_DIR"
SECURITY=""
if [ -n "$TRUSTED_KEY" ]; then
    mkdir -p "$CONF_DIR/keys"
    cp "$TRUSTED_KEY" "$CONF_DIR/keys/$(basename "$TRUSTED_KEY")"
    SECURITY="${SECURITY}trusted_keys = [\"$CONF_DIR/keys\"]
"
fi
if [ -n "$PASSWORD_FILE" ]; then
    install -m 0600 "$PASSWORD_FILE" "$CONF_DIR/password"
    SECURITY="${SECURITY}username = \"$DEVICE_ID\"
password_file = \"$CONF_DIR/password\"
"
fi
if [ ! -f "$CONF_DIR/agent.toml" ]; then
    cat > "$CONF_DIR/agent.toml" <<CONF
device_id = "$DEVICE_ID"
broker = "$BROKER"
data = "/var/lib/edgectl"
profile = "$PROFILE"
${SECURITY}
[labels]
group = "$GROUP"
CONF
fi
# Check the file before systemd runs it: a bad key fails here with one line.
"$PREFIX/bin/python" -c "import sys; from agent.main import build_parser, resolve; resolve(build_parser().parse_args(['--config', sys.argv[1]]))" "$CONF_DIR/agent.toml"
UNIT=$("$PREFIX/bin/python" -c "import devices, pathlib; print(pathlib.Path(devices.__file__).parent / 'systemd' / 'edgectl-agent.service')")
cp "$UNIT" "$UNIT_DIR/edgectl-agent.service"
systemctl daemon-reload
systemctl enable edgectl-agent >/dev/null
systemctl restart edgectl-agent
echo "edgectl-agent installed: $DEVICE_ID -> $BROKER (profile $PROFILE). Logs: journalctl -u edgectl-agent -f"
