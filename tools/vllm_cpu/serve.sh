#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server on CPU for a (tiny) local model.
#
#   tools/vllm_cpu/serve.sh [--model DIR] [--host HOST] [--port PORT] [-- EXTRA vLLM ARGS...]
#
# Defaults: --model <repo>/.models/tiny-qwen2vl, --host 127.0.0.1, --port 8000.
# Unknown arguments (with or without a leading "--") are passed to vLLM unchanged,
# so e.g. `serve.sh --port 8011 --max-num-seqs 4` works.
# The model is served under the name "tiny-qwen2vl" (SERVED_MODEL_NAME overrides).
#
# The script ends by `exec`ing python, so the server has this script's PID:
# SIGTERM or SIGINT to that PID stops the API server, the engine core and the
# worker (all gone in about 2 s). SIGKILL does not: vLLM's engine core and worker
# are left running. To be safe against that, start the server in its own session
# (Popen(..., start_new_session=True)) and signal the process group (os.killpg).
# Environment: VENV (default <repo>/.venv-vllm) must have been made by setup.sh.
set -euo pipefail

# Print the comment block above as help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/.venv-vllm}"
model="$repo/.models/tiny-qwen2vl"
host="127.0.0.1"
port="8000"
served_name="${SERVED_MODEL_NAME:-tiny-qwen2vl}"
extra=()

while (($#)); do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --model=*) model="${1#*=}"; shift ;;
    --host) host="$2"; shift 2 ;;
    --host=*) host="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

preload_file="$venv/lib/cuda-stubs/ld_preload"
if [[ ! -x "$venv/bin/python" || ! -f "$preload_file" ]]; then
  echo "serve.sh: $venv is not set up; run tools/vllm_cpu/setup.sh first" >&2
  exit 2
fi
if [[ ! -f "$model/config.json" ]]; then
  echo "serve.sh: no model at $model; run tools/vllm_cpu/setup.sh first or pass --model" >&2
  exit 2
fi

# Stub c10::cuda / at::cuda libraries: without them the registry's (CUDA) torchvision
# cannot be imported next to CPU torch. See build_cuda_stubs.py.
LD_PRELOAD="$(<"$preload_file")${LD_PRELOAD:+:$LD_PRELOAD}"
export LD_PRELOAD
# KV cache size in GiB; 1 is plenty for a 1024-token context.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# Never reach for a model hub; everything is local.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

# Flags: float32 and eager mode are what the CPU backend runs reliably; 1024 tokens
# hold a prompt with a few 16-token images plus a 512-token JSON answer. Videos are
# off (the tiny model is for image tests). Structured output: xgrammar is what
# "auto" picks; disable_any_whitespace is a server-wide setting (the per-request
# field is ignored) and without it a random model can emit JSON whitespace until
# max_tokens. Later arguments override these (the last occurrence wins).
# `python -m ...api_server`, not the `vllm` console script: the latter looks up the
# distribution "vllm", but the package is installed as "vllm-cpu".
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$model" \
  --served-model-name "$served_name" \
  --host "$host" \
  --port "$port" \
  --dtype float32 \
  --enforce-eager \
  --max-model-len 1024 \
  --limit-mm-per-prompt '{"image": 4, "video": 0}' \
  --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}' \
  "${extra[@]}"
