#!/usr/bin/env bash
# Set up an environment that translates the pipeline for Dataflow, offline (a dry run).
#
#   tools/dataflow/setup.sh [--force]
#
# Creates $VENV (default <repo>/.venv-dataflow) with apache-beam[gcp] (the Google Cloud client
# libraries Beam's DataflowRunner imports) and this project (`-e .`), both under the project's
# constraints.txt, so Beam and every shared dependency are the versions the main .venv has.
# It is a venv of its own because the gcp extra adds ~60 packages the local build does not need.
#
# Then, with that venv's python, a dry run builds the job Dataflow would receive without
# contacting Google Cloud:
#   .venv-dataflow/bin/python -m pipelines.build_dataset --input ... --output gs://b/out \
#     --runner=DataflowRunner --dry_run=True --project=demo --region=us-central1 \
#     --temp_location=gs://demo/tmp --sdk_location=container --no_auth
#
# Idempotent: the venv's stamp holds a hash of its inputs (constraints.txt, setup.py, this
# script, the Python version); while it matches, a rerun only checks the stamp (well under a
# second). A changed input redoes the venv from scratch; --force always does. Concurrent runs
# are serialized by a lock.
# Exit status: 0 ready; 3 the package registry could not provide the packages (unreachable, or
# a package missing there); 1 any other failure; 2 bad usage.
# Environment: VENV, PYTHON (a Python 3.10+ interpreter, default python3).
set -euo pipefail

# Print the comment block above as help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/.venv-dataflow}"
python="${PYTHON:-python3}"
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

stamp="$venv/.setup-stamp"
# Tool output goes to a temporary log, shown (and kept) only when a step fails.
log="$(mktemp -t dataflow-setup.XXXXXX.log)"
trap 'rm -f "$log"' EXIT

now() { date +%s.%N; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
step() { printf '[dataflow-setup] %s\n' "$*" >&2; }
fail() {
  local status="${2:-1}"
  printf '[dataflow-setup] FAILED: %s\n' "$1" >&2
  if [[ -s "$log" ]]; then
    tail -n 40 "$log" >&2
    trap - EXIT
    printf '[dataflow-setup] full log: %s\n' "$log" >&2
  fi
  exit "$status"
}
# pip's messages when the registry cannot serve a package (as opposed to a conflict or a
# build error, which are real failures).
registry_missing() {
  grep -qE 'No matching distribution found|Could not find a version that satisfies|NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|ConnectTimeoutError|Max retries exceeded' "$log"
}

# One setup at a time per venv (parallel test workers, two shells).
if command -v flock >/dev/null; then
  exec 9>"${TMPDIR:-/tmp}/dataflow-env-$(printf '%s' "$venv" | sha256sum | cut -c1-16).lock"
  flock 9
fi

py_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || fail "no Python interpreter '$python' (set PYTHON)"
key="py$py_version-$(cat "$repo/constraints.txt" "$repo/setup.py" "$here/setup.sh" | sha256sum | cut -c1-16)"

if ((force == 0)) && [[ -f "$stamp" && "$(<"$stamp")" == "$key" && -x "$venv/bin/python" ]]; then
  step "venv $venv is up to date ($key)"
  exit 0
fi

start="$(now)"
step "creating $venv (apache-beam[gcp] + this project, constraints.txt)"
rm -rf "$venv"
"$python" -m venv "$venv" >"$log" 2>&1 || fail "python -m venv"
# constraints.txt pins apache-beam 2.77.0 and every package it shares with the gcp extra
# (protobuf, grpcio, pyarrow, numpy, requests, ...); the gcp-only packages (google-cloud-*,
# google-auth, google-api-core, ...) are not in it and resolve freely against those pins.
"$venv/bin/pip" install --no-input -q -c "$repo/constraints.txt" \
    "apache-beam[gcp]==2.77.*" -e "$repo" >"$log" 2>&1 || {
  registry_missing && fail "the package registry could not provide the packages" 3
  fail "pip install apache-beam[gcp] -e ."
}
"$venv/bin/pip" check >"$log" 2>&1 || fail "pip check"
"$venv/bin/python" - >"$log" 2>&1 <<'EOF' || fail "import check"
import apache_beam
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner  # needs the gcp extra
from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401
import pipelines.build_dataset  # noqa: F401
print("apache-beam", apache_beam.__version__)
EOF
sed 's/^/[dataflow-setup]   /' "$log" >&2
echo "$key" >"$stamp"
step "ready in $(since "$start") s ($(du -sh "$venv" | cut -f1))"
