#!/usr/bin/env bash
# Build a dataset on a Spark cluster (standalone master). Each worker node runs an SDK worker
# pool from the worker image (deploy/dataflow/Dockerfile), with its GPU:
#   docker run -d --gpus all --net=host IMAGE --worker_pool
# Beam's SparkRunner starts the Spark job server itself (Java 11+ where this runs; the job-server
# jar is fetched once from Maven Central, or pass --spark_job_server_jar=/path/to/jar).
#
#   SPARK_MASTER=spark://spark-master:7077 deploy/spark/run.sh --input hdfs://... --output ... --config my.yaml
#   deploy/spark/run.sh --print-flags
#
# Optional: WORKER_POOL (localhost:50000), PYTHON (python).
set -euo pipefail
: "${SPARK_MASTER:?set SPARK_MASTER (spark://host:7077)}"

FLAGS=(
  --runner=SparkRunner
  --spark_master_url="$SPARK_MASTER"
  --spark_version=3
  --environment_type=EXTERNAL
  --environment_config="${WORKER_POOL:-localhost:50000}"
)
if [[ "${1:-}" == "--print-flags" ]]; then
  printf '%s\n' "${FLAGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" -m pipelines.build_dataset "$@" "${FLAGS[@]}"
