#!/usr/bin/env bash
# The GPU checks in one device call (DEVELOPERS.md, "GPU checks"): about 5 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT/gpu_check.md ($OUT or /tmp/gpu_check)
#
# 1. the CuPy kernels against the PyTorch reference (tests/test_backends.py -k cupy), and the
#    CPU-side CUDA checks (emulation, NVRTC, host syncs) on this machine's toolchain;
# 2. no synchronising call in ATMN's forward, backward and quantize on CUDA with
#    value_checks('deferred') (torch.cuda.set_sync_debug_mode('error'));
# 3. bench_neuron on CUDA (ATMN's backends beside SpikingJelly 2's LIFNode, which dispatches to
#    its own Triton/CUDA kernels on a GPU) at T = 4, 8, 16 and N = 2^16, 2^20, 2^22, float32,
#    and float16 at T = 4, N = 2^22 (SpikingJelly's published table: LIF fwd+bwd fp16, 2^22,
#    RTX 4090, T = 4: 0.77 ms Triton, 0.67 ms CuPy);
# 4. a MAR training step per backend beside its dense twin (bench_train_step), and a short
#    bf16-autocast training run;
# 5. with two GPUs or more, a 2-process nccl distillation run.
#
# The GPU machines have Python 3.12, torch (CUDA) and cupy-cuda13x but no spikingjelly, norse,
# nir or hypothesis: carry them as wheels in .whl/ (DEVELOPERS.md says how); they are installed
# into /tmp/site here. Every step runs even when one fails; the exit status says if any did.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.md"
: >"$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() { # step TITLE TIMEOUT_S COMMAND...: run, keep the last 60 lines of output in the log
  local title=$1 limit=$2
  shift 2
  echo "## $title" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/step.txt" 2>&1
  local rc=$?
  { echo '```'; tail -n 60 "$OUT/step.txt"; echo '```'; echo "exit $rc, $((SECONDS - start)) s"; echo; } >>"$LOG"
  tail -n 5 "$OUT/step.txt"
  echo "-> exit $rc"
  [ "$rc" -eq 0 ] || failed=1
}

step "device" 30 bash -c 'date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import sys, torch, cupy; print(sys.version.split()[0], \"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cupy\", cupy.__version__)"; uptime'

step "CuPy kernels vs the reference" 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_backends.py -k cupy

step "CUDA checks without a GPU, here (emulation, NVRTC, host syncs)" 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_host_syncs.py

step "no host syncs on the GPU" 120 python3 - <<'EOF'
import torch
from spikemar.neurons import ATMN, raise_deferred_errors, value_checks

for backend in ("cupy", "torch"):
    n = ATMN(tau=1.5, v_threshold=0.5, num_channels=256, step_mode="m", backend=backend).cuda()
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    n(x).sum().backward()  # warm-up: builds the kernels, allocates
    n.reset()
    torch.cuda.synchronize()
    with value_checks("deferred"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            spikes = n(x)
            spikes.float().sum().backward()
            n.reset()
            decoded, _ = n.quantize(x[0].detach(), 4)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    raise_deferred_errors()  # the one read of the step
    print(f"backend={backend}: no synchronising call in forward, backward and quantize")
EOF

step "bench_neuron float32" 420 python3 benchmarks/bench_neuron.py --device cuda --T 4 8 16 --N 65536 1048576 4194304 --no-progress --json "$OUT/bench_neuron_f32.json"

step "bench_neuron float16, T=4, N=2^22" 180 python3 benchmarks/bench_neuron.py --device cuda --T 4 --N 4194304 --dtype float16 --no-progress --json "$OUT/bench_neuron_f16.json"

step "MAR training step per backend beside its dense twin" 300 python3 benchmarks/bench_train_step.py --device cuda --json "$OUT/bench_train_step.json"

step "bf16 autocast training" 240 bash -c 'python3 -m spikemar train --device cuda --amp bf16 --model mar --steps 50 --eval-interval 50 --d-model 64 --n-layers 2 --out /tmp/gpu_check_mar.pt --overwrite'

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step "2-process nccl distillation" 300 bash -c 'python3 -m spikemar train --device cuda --model mar-dense --steps 30 --eval-interval 30 --d-model 64 --n-layers 2 --out /tmp/gpu_check_dense.pt --overwrite && torchrun --nproc-per-node 2 -m spikemar distill --stage 2 --device cuda --teacher /tmp/gpu_check_dense.pt --steps 30 --eval-interval 30 --out /tmp/gpu_check_student.pt --overwrite'
fi

echo "results: $LOG"
exit "$failed"
