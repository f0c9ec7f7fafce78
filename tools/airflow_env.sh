#!/usr/bin/env bash
# Set up a local Apache Airflow for the dataset DAG (dags/build_dataset.py).
#
#   tools/airflow_env.sh [--force]           set up (or check) the environment
#   tools/airflow_env.sh [--force] -- CMD..  set up, then run CMD inside it, e.g.
#       tools/airflow_env.sh -- airflow dags test build_dataset -c '{"input": "synthetic://3"}'
#   source tools/airflow_env.sh              only export the settings below (and PATH) into
#                                            this shell; installs nothing
#
# 1. Creates AIRFLOW_VENV (default <repo>/.venv-airflow), a venv of its own (Airflow's pins
#    conflict with Beam's), holding apache-airflow 3.3.2 and the standard provider,
#    pinned below. The DAG runs the pipeline with the project's interpreter, so this
#    venv needs nothing of the project.
# 2. Runs `airflow db migrate` into AIRFLOW_HOME (default <repo>/.airflow, SQLite), with
#    the DAGs folder <repo>/dags, no example DAGs, and new DAGs unpaused.
# 3. Writes $AIRFLOW_HOME/env.sh with those settings and the venv on PATH; source it
#    to use `airflow` by hand (or use the `--` form above). `airflow dags test` reads
#    the DAGs folder itself; `airflow dags list` and the UI show the DAG once it is
#    serialized (`airflow dags reserialize`, or a running dag-processor).
#
# Idempotent and safe to run concurrently (a lock serializes setups): each step writes
# a stamp holding a hash of its inputs and is skipped while the stamp matches; a changed
# pin redoes the venv (from scratch) and the migration. --force redoes everything.
# Environment: AIRFLOW_VENV, AIRFLOW_HOME, PYTHON (a Python 3.10-3.13 interpreter,
# default python3).

# Pins: Airflow itself and the provider the DAG imports (`@task` comes from the standard one).
AIRFLOW_PINS=(
  "apache-airflow==3.3.2"
  "apache-airflow-providers-standard==1.21.0"
)

_airflow_env_setup() {
  local here repo
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  repo="$(cd "$here/.." && pwd)"
  export AIRFLOW_HOME="${AIRFLOW_HOME:-$repo/.airflow}"
  export AIRFLOW__CORE__DAGS_FOLDER="$repo/dags"
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
  AIRFLOW_VENV="${AIRFLOW_VENV:-$repo/.venv-airflow}"
}

# Sourced: the settings only; nothing installed, no `set -e` leaking into the caller's shell.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  _airflow_env_setup
  export PATH="$AIRFLOW_VENV/bin:$PATH"
  unset -f _airflow_env_setup
  return 0
fi

set -euo pipefail

# Print the comment block above as help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

force=0
command=()
while (($#)); do
  case "$1" in
    --force) force=1; shift ;;
    --) shift; command=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

_airflow_env_setup
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
venv_stamp="$AIRFLOW_VENV/.setup-stamp"
migrate_stamp="$AIRFLOW_HOME/.migrate-stamp"
# Tool output goes to a temporary log, shown (and kept) only when a step fails.
log="$(mktemp -t airflow-setup.XXXXXX.log)"
trap 'rm -f "$log"' EXIT

now() { date +%s.%N; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
step() { printf '[airflow-setup] %s\n' "$*" >&2; }
fail() {
  printf '[airflow-setup] FAILED: %s\n' "$1" >&2
  if [[ -s "$log" ]]; then
    tail -n 40 "$log" >&2
    trap - EXIT
    printf '[airflow-setup] full log: %s\n' "$log" >&2
  fi
  exit 1
}

# One setup at a time per venv (parallel test workers, two shells).
if command -v flock >/dev/null; then
  exec 9>"${TMPDIR:-/tmp}/airflow-env-$(printf '%s' "$AIRFLOW_VENV" | sha256sum | cut -c1-16).lock"
  flock 9
fi

py_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || fail "no Python interpreter '$python' (set PYTHON)"
case "$py_version" in
  3.10|3.11|3.12|3.13) ;;
  *) fail "Airflow 3.3 needs Python 3.10-3.13; $python is $py_version (set PYTHON)" ;;
esac
venv_key="py$py_version-$( (printf '%s\n' "${AIRFLOW_PINS[@]}"; cat "$here/airflow-constraints.txt") | sha256sum | cut -c1-16)"
total_start="$(now)"

# ------------------------------------------------------------------ 1: the venv
if ((force == 0)) && [[ -f "$venv_stamp" && "$(<"$venv_stamp")" == "$venv_key" ]]; then
  step "venv $AIRFLOW_VENV is up to date ($venv_key)"
else
  start="$(now)"
  step "creating $AIRFLOW_VENV (${AIRFLOW_PINS[*]})"
  rm -rf "$AIRFLOW_VENV"
  "$python" -m venv "$AIRFLOW_VENV" || fail "python -m venv"
  "$AIRFLOW_VENV/bin/pip" install --no-input -q -c "$here/airflow-constraints.txt" \
    "${AIRFLOW_PINS[@]}" >"$log" 2>&1 \
    || fail "pip install ${AIRFLOW_PINS[*]}"
  "$AIRFLOW_VENV/bin/pip" check >"$log" 2>&1 || fail "pip check"
  echo "$venv_key" >"$venv_stamp"
  rm -f "$migrate_stamp"
  step "packages installed in $(since "$start") s ($(du -sh "$AIRFLOW_VENV" | cut -f1))"
fi

# ------------------------------------------------------- 2: the metadata database
if ((force == 0)) && [[ -f "$migrate_stamp" && "$(<"$migrate_stamp")" == "$venv_key" ]] \
    && [[ -f "$AIRFLOW_HOME/airflow.db" ]]; then
  step "database in $AIRFLOW_HOME is up to date"
else
  start="$(now)"
  mkdir -p "$AIRFLOW_HOME"
  "$AIRFLOW_VENV/bin/airflow" db migrate >"$log" 2>&1 || fail "airflow db migrate"
  echo "$venv_key" >"$migrate_stamp"
  step "database migrated in $(since "$start") s"
fi

# ------------------------------------------------------------- 3: env.sh for shells
cat >"$AIRFLOW_HOME/env.sh" <<EOF
# Written by tools/airflow_env.sh: \`source $AIRFLOW_HOME/env.sh\`, then use \`airflow\`.
export AIRFLOW_HOME='$AIRFLOW_HOME'
export AIRFLOW__CORE__DAGS_FOLDER='$AIRFLOW__CORE__DAGS_FOLDER'
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export PATH='$AIRFLOW_VENV/bin':"\$PATH"
EOF

step "ready in $(since "$total_start") s: AIRFLOW_HOME=$AIRFLOW_HOME, DAGs from $AIRFLOW__CORE__DAGS_FOLDER"
if ((${#command[@]})); then
  trap - EXIT
  rm -f "$log"
  exec 9>&-   # release the setup lock: the command may run for long
  export PATH="$AIRFLOW_VENV/bin:$PATH"
  exec "${command[@]}"
fi
