#!/usr/bin/env bash
# GPU figures, ready to run on a CUDA machine that has torch/torchvision but no package registry.
#
#   On a machine with a registry, once:   make gpu-wheels          (cp312 wheels → .whl/, ~30 MB)
#   Copy the project tree (with .whl/) to the GPU machine, then there:
#                                         bash bench/gpu.sh [--wheels .whl] [--images 8]
#   Here, to see that it works (tiny SAM on CPU, seconds):
#                                         bash bench/gpu.sh --smoke
#
# Writes bench/results/gpu-sam-vit_b.json, gpu-sam-vit_h.json (SAM automatic masks, stock
# SamAutomaticMaskGenerator vs the fast path, random weights: the timing of trained ones) and
# gpu-pipeline.json (images/s of the whole build with sam-auto + captioner none), or the smoke-*
# versions with --smoke. GPU figures are only those measured on a GPU: every file names the device.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="" IMAGES=8 SMOKE=0 OUTDIR=bench/results PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$WHEELS" ]; then
  # only what the GPU image lacks travels as wheels; torch, numpy, pyarrow, pillow ... are there
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/multigran-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/multigran-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUTDIR"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu PREFIX=smoke MODELS="tiny" SIZES="2 10" SIDE=128 SAM_ARGS="--smoke"
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: GPU figures need one (use --smoke to try the script)')"
  DEVICE=cuda PREFIX=gpu MODELS="vit_b vit_h" SIZES="8 40" SIDE=1024 SAM_ARGS="--images $IMAGES --device cuda"
fi

for model in $MODELS; do
  if [ "$SMOKE" = 1 ]; then args="$SAM_ARGS"; else args="$SAM_ARGS --model-type $model"; fi
  "$PYTHON" -m bench.sam_bench $args --json "$OUTDIR/$PREFIX-sam-$model.json"
done

# The whole build: sam-auto (random vit_b weights; tiny with --smoke) + captioner none, marginal
# images/s between two input sizes so start-up and model loading do not count.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=$([ "$SMOKE" = 1 ] && echo tiny || echo vit_b)
cat > "$work/config.yaml" <<EOF
segmenter: {name: sam-auto, model_type: $model, init_seed: 0, device: $DEVICE, fast: true,
            points_per_side: $([ "$SMOKE" = 1 ] && echo 8 || echo 32)}
captioner: {name: none}
shards: {samples_per_shard: 64}
EOF
"$PYTHON" - "$work" "$DEVICE" "$SIDE" "$OUTDIR/$PREFIX-pipeline.json" $SIZES <<'EOF'
import json, subprocess, sys, time
work, device, side, out, small, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *map(int, sys.argv[5:7])
walls = {}
for n in (small, big):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.build_dataset", "--input", f"synthetic://{n}?size={side}",
                    "--output", f"{work}/out-{n}", "--config", f"{work}/config.yaml", "--no-progress"], check=True)
    walls[n] = time.perf_counter() - start
manifest = json.load(open(f"{work}/out-{big}/manifest.json"))
name = "cpu"
if device == "cuda":
    import torch
    name = torch.cuda.get_device_name(0)
report = {"device": name, "segmenter": manifest["annotators"]["segmenter"], "image_side": side,
          "walls_s": walls, "images_per_s": round((big - small) / (walls[big] - walls[small]), 3),
          "written": manifest["counts"]["written"], "seconds_per_stage": manifest["seconds_per_stage"]}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({k: report[k] for k in ("device", "images_per_s", "written")}))
EOF
echo "wrote $OUTDIR/$PREFIX-*.json"
