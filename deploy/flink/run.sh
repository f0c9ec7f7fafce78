#!/usr/bin/env bash
# Build a dataset on a Flink cluster. Each TaskManager node runs an SDK worker pool from the
# worker image (deploy/dataflow/Dockerfile), with its GPU:
#   docker run -d --gpus all --net=host IMAGE --worker_pool
# and the job's bundles run there (--environment_type=EXTERNAL). Beam's FlinkRunner starts the
# Flink job server itself (it needs Java 11+ where this runs and fetches the job-server jar
# once from Maven Central; or pass --flink_job_server_jar=/path/to/beam-runners-flink-job-server.jar).
#
#   FLINK_MASTER=flink-jm:8081 deploy/flink/run.sh --input s3://b/images --output s3://b/out --config my.yaml
#   deploy/flink/run.sh --print-flags
#
# Optional: FLINK_VERSION (1.20; Beam 2.77 knows 1.19, 1.20, 2.0, 2.1, 2.2), PARALLELISM (one per
# GPU, default 4), WORKER_POOL (localhost:50000, the pool on each node), PYTHON (python).
set -euo pipefail
: "${FLINK_MASTER:?set FLINK_MASTER (host:port of the JobManager REST endpoint)}"

FLAGS=(
  --runner=FlinkRunner
  --flink_master="$FLINK_MASTER"
  --flink_version="${FLINK_VERSION:-1.20}"
  --parallelism="${PARALLELISM:-4}"
  --environment_type=EXTERNAL
  --environment_config="${WORKER_POOL:-localhost:50000}"
)
if [[ "${1:-}" == "--print-flags" ]]; then
  printf '%s\n' "${FLAGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" -m pipelines.build_dataset "$@" "${FLAGS[@]}"
