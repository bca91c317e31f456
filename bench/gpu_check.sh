#!/usr/bin/env bash
# The GPU checks of featstudy, as one prepared run on a machine with a CUDA device (issue 16). CI never runs this.
#
#   bench/gpu_check.sh wheels      # here, with network: the pure-Python wheels a bare PyTorch image lacks -> .whl/
#   bench/gpu_check.sh             # there: the CUDA tests, then bench/extract.py in fp32 and bf16-mixed
#
# On the project's device machine (python3 with torch, Lightning, numpy, scipy, pillow, filelock; no Hydra, no
# MLflow), carry `.whl` and the script installs it into /tmp/site first. Results go to $OUT (default bench-gpu/):
# nvidia-smi.txt, tests.log, extract-fp32.json, extract-bf16.json. Copy the figures into docs/benchmarks.md.
# Budget: about 6 minutes on an H100/H200 (tests ~2 min, each bench ~1-2 min).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 hydra-core==1.3.2 PyYAML==6.0.2 tqdm==4.67.1)

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
if ! "$PY" -c "import omegaconf, hydra" 2>/dev/null; then
    [ -d .whl ] || { echo "gpu_check: omegaconf/hydra missing and no .whl/ (run: bench/gpu_check.sh wheels)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
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
for prec in 32-true bf16-mixed; do
    "$PY" bench/extract.py --accelerator gpu --precision "$prec" --n-images 512 --model-images 256 \
        --batch-size 16 --repeats 1 > "$OUT/extract-${prec%%-*}.json" 2> "$OUT/extract-${prec%%-*}.err" || status=1
    cat "$OUT/extract-${prec%%-*}.json"
done
exit $status
