#!/usr/bin/env bash
# Wheels for bench/gpu.sh on a GPU machine without a package registry (Python 3.12, x86-64, with
# torch, torchvision, numpy, pyarrow, pillow, scikit-image, opencv, grpcio, protobuf preinstalled):
# downloads what the project needs beyond those into DIR (default .whl/, ~37 MB).
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
pin() { grep -i "^$1==" constraints.txt | head -1; }
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" \
  "$(pin apache-beam)" "$(pin segment-anything)" "$(pin webdataset)" "$(pin jsonschema)" \
  "$(pin fastjsonschema)" "pycocotools>=2.0.8"
# already on the GPU image: a second copy would shadow the image's own build
for name in numpy pyarrow pillow grpcio protobuf pyyaml packaging urllib3 certifi requests idna \
            charset_normalizer python_dateutil pyparsing attrs typing_extensions six sortedcontainers; do
  rm -f "$DIR"/${name}-[0-9]*.whl
done
du -sh "$DIR"
