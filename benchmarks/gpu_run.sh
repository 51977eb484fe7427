#!/bin/bash
# The GPU runs of benchmarks/GPU.md in one command (issue 26), from a GPU machine with torch,
# triton, hypothesis and ml_dtypes; OUT names a folder for the logs: smoke, then the
# 1000-example gates, the planted bugs, the isolation benchmark and the offline CLI install.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
N=${N:-1000}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import sys,torch,triton,numpy,hypothesis,ml_dtypes;print(sys.version.split()[0],torch.__version__,torch.version.cuda,triton.__version__,numpy.__version__,hypothesis.__version__,ml_dtypes.__version__)"
P="python3 -m pytest -q -p no:cacheprovider --durations=3 --hypothesis-show-statistics tests/controls/gpu/test_gpu_controls.py"
DFC_GPU_EXAMPLES=20 timeout 170 $P -x -k "gpu_control_conforms" > $OUT/smoke.log 2>&1
rc=$?; tail -5 $OUT/smoke.log; [ $rc = 0 ] || { tail -80 $OUT/smoke.log; exit 1; }
for c in grouped vllm; do for m in faithful ideal; do
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "gpu_control_conforms and $c and $m" > $OUT/$c-$m.log 2>&1 &
done; done
timeout ${T:-330} $P -k "planted and gpu_control" > $OUT/planted.log 2>&1 &
(timeout 150 python3 benchmarks/gpu_gate.py 10;
 pip install -q --no-build-isolation --no-deps -e . && cd tests && /usr/bin/time -f "check: %e s" timeout 120 dfc-oracle check controls.gpu.grouped_mm:dispatch_ffn_combine --kernel torch-grouped-mm --variants bf16 --max-examples 30; echo "check exit $?") > $OUT/gate.log 2>&1 &
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "passed|failed|error|Error|seconds|slowest|^[0-9.]+s call|passing examples|Typical runtimes" $f | head -20; done
cat $OUT/gate.log | tail -15
