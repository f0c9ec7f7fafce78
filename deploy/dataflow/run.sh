#!/usr/bin/env bash
# Build a dataset on Dataflow with GPU workers: SAM on one NVIDIA L4 per worker, captions from a
# vLLM fleet reached over the VPC (endpoints in the config). The worker image is
# deploy/dataflow/Dockerfile, pushed to Artifact Registry.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=gs://my-bucket \
#   IMAGE=us-central1-docker.pkg.dev/my-project/images/multigran-worker:0.1.0 \
#   SUBNETWORK=regions/us-central1/subnetworks/data \
#     deploy/dataflow/run.sh --input gs://my-bucket/images --output gs://my-bucket/out \
#       --config deploy/dataflow/sam-vllm.yaml
#
#   deploy/dataflow/run.sh --print-flags     only print the Beam flags, one per line
#
# Optional: GPU_TYPE (nvidia-l4), GPU_COUNT (1), MACHINE_TYPE (g2-standard-8), MAX_WORKERS (8),
# DISK_GB (100), SUBNETWORK (the subnet the vLLM fleet is reachable from; with it workers get
# no public IP), SERVICE_ACCOUNT, PYTHON (python).
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET (gs://...)}" "${IMAGE:?set IMAGE}"

FLAGS=(
  --runner=DataflowRunner
  --project="$PROJECT"
  --region="$REGION"
  --temp_location="$BUCKET/tmp"
  --staging_location="$BUCKET/staging"
  --sdk_container_image="$IMAGE"      # the project and its pins are in the image: no --setup_file
  --sdk_location=container
  --experiments=use_runner_v2
  --experiments=no_use_multiple_sdk_containers   # one SDK process per VM: one SAM per GPU
  --dataflow_service_options="worker_accelerator=type:${GPU_TYPE:-nvidia-l4};count:${GPU_COUNT:-1};install-nvidia-driver"
  --machine_type="${MACHINE_TYPE:-g2-standard-8}"
  --max_num_workers="${MAX_WORKERS:-8}"
  --disk_size_gb="${DISK_GB:-100}"
)
if [[ -n "${SUBNETWORK:-}" ]]; then
  FLAGS+=(--subnetwork="$SUBNETWORK" --no_use_public_ips)
fi
if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then
  FLAGS+=(--service_account_email="$SERVICE_ACCOUNT")
fi

if [[ "${1:-}" == "--print-flags" ]]; then
  printf '%s\n' "${FLAGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" -m pipelines.build_dataset "$@" "${FLAGS[@]}"
