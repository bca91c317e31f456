#!/usr/bin/env bash
# The GPU checks of featstudy, as one prepared run on a machine with a CUDA device (issues 13 and 16). CI never runs
# this.
#
#   bench/gpu_check.sh wheels      # here, with network: the pure-Python wheels a bare PyTorch image lacks -> .whl/
#   bench/gpu_check.sh             # there: the CUDA tests, then bench/gpu_check.py (the table below)
#   bench/gpu_check.sh --cpu       # anywhere: bench/gpu_check.py --cpu alone (no tests, small sizes, ~1 min)
#
# bench/gpu_check.py prints, for VGG19 and a timm ViT (random weights seeded, ten crops 256/224): the max abs and
# max relative difference of the fp32 features GPU vs CPU (20 images), img/s with the real loader for fp32,
# channels_last and bf16-mixed and their differences to fp32; then signed_ks's time (bins=100, exact) at cub200
# scale on the machine's CPUs. The ViT part is skipped with one line if timm cannot be imported, the KS part if
# numba cannot.
# On the project's device machine (python3 with torch, Lightning, numpy, scipy, pillow, filelock; no Hydra, no
# MLflow), carry `.whl` and the script installs it into /tmp/site first. Results go to $OUT (default bench-gpu/):
# nvidia-smi.txt, tests.log, gpu_check.json, gpu_check.txt. Copy the figures into docs/benchmarks.md.
# Budget: at most 8 minutes on an H100/H200 (tests ~2 min, gpu_check.py ~3 min).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 hydra-core==1.3.2 PyYAML==6.0.2 tqdm==4.67.1 timm==1.0.31
        safetensors==0.8.0)

if [ "${1:-}" = "wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit $?
fi

OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# omegaconf/hydra are needed (no .whl/: exit 2); timm/safetensors are taken from .whl/ too when there (else the ViT
# part is skipped with one line)
if ! "$PY" -c "import omegaconf, hydra" 2>/dev/null || { [ -d .whl ] && ! "$PY" -c "import timm, safetensors" 2>/dev/null; }; then
    [ -d .whl ] || { echo "gpu_check: omegaconf/hydra missing and no .whl/ (run: bench/gpu_check.sh wheels)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "${1:-}" = "--cpu" ]; then
    "$PY" bench/gpu_check.py --cpu 2>&1 | tee "$OUT/gpu_check.txt"
    exit "${PIPESTATUS[0]}"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 2
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
status=0
# the CUDA-only tests (GPU fp32 = CPU; device normalisation bit-identical on CUDA), then the loader's and the
# background shards' tests with CUDA present (pinned memory, uint8 crops normalised on the device)
"$PY" -m pytest -q -p no:randomly -p no:cacheprovider -m gpu tests/extraction/test_extract.py \
    tests/extraction/test_loader.py 2>&1 | tee "$OUT/tests.log" || status=1
"$PY" -m pytest -q -p no:randomly -p no:cacheprovider tests/extraction/test_loader.py \
    tests/extraction/test_background_shards.py 2>&1 | tee -a "$OUT/tests.log" || status=1
"$PY" bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
