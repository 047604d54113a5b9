#!/usr/bin/env bash
# The GPU checks in one device call (DEVELOPERS.md, "GPU checks"): about 5 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT/gpu_check.md ($OUT or /tmp/gpu_check)
#
# 1. the CuPy kernels against the PyTorch reference (tests/test_backends.py -k cupy);
# 2. the fused spike point (cupy_backend.atmn_quantize_cupy) against atmn_quantize on the GPU
#    (decode, gradients, spike counts; float32/bfloat16/float16, T up to 100), and no
#    synchronising call in ATMN's forward, backward and quantize, in the fused spike point and
#    in a spiking MAR training step on CUDA with value_checks('deferred')
#    (torch.cuda.set_sync_debug_mode('error'));
# 3. bench_neuron on CUDA (ATMN's backends beside SpikingJelly 2's LIFNode, which dispatches to
#    its own Triton/CUDA kernels on a GPU) at T = 4, 8, 16 and N = 2^16, 2^20, 2^22, float32,
#    and float16 at T = 4, N = 2^22 (SpikingJelly's published table: LIF fwd+bwd fp16, 2^22,
#    RTX 4090, T = 4: 0.77 ms Triton, 0.67 ms CuPy);
# 4. a MAR training step per backend beside its dense twin (bench_train_step), and a short
#    bf16-autocast training run;
# 5. with two GPUs or more, a 2-process nccl distillation run;
# 6. the CPU-side CUDA checks (emulation; NVRTC, from the CUDA toolkit here when no
#    nvidia-cuda-nvrtc-cu12 wheel is installed; host syncs) on this machine's toolchain.
#
# The GPU machines have Python 3.12, torch (CUDA) and cupy-cuda13x but no spikingjelly, norse,
# nir or hypothesis: carry them as wheels in .whl/ (DEVELOPERS.md says how); they are installed
# into /tmp/site here. The training runs read README.md: the shared data folder beside the
# repository (their default) does not travel to the device machine. Every step runs even when
# one fails; the exit status says if any did. The steps share a deadline ($GPU_CHECK_SECONDS,
# default 540 s, inside one 600 s device call): each step's limit is cut to what is left, and a
# step with less than 15 s left is skipped, so that the log always comes back.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEADLINE=${GPU_CHECK_SECONDS:-540}
DATA="$PWD/README.md"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.md"
: >"$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() { # step TITLE TIMEOUT_S COMMAND...: run, keep the last 60 lines of output in the log
  local title=$1 limit=$2
  shift 2
  echo "## $title" | tee -a "$LOG"
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    { echo "skipped: the script's $DEADLINE s are spent"; echo; } | tee -a "$LOG"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/step.txt" 2>&1
  local rc=$?
  { echo '```'; tail -n 60 "$OUT/step.txt"; echo '```'; echo "exit $rc, $((SECONDS - start)) s"; echo; } >>"$LOG"
  tail -n 5 "$OUT/step.txt"
  echo "-> exit $rc"
  [ "$rc" -eq 0 ] || failed=1
}

step "device" 30 bash -c 'date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import sys, torch, cupy; print(sys.version.split()[0], \"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cupy\", cupy.__version__)"; uptime'

step "CuPy kernels vs the reference" 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_backends.py -k cupy

step "the fused spike point against the reference on the GPU" 120 python3 - <<'EOF'
import math

import torch

from spikemar.neurons import ATMNParameters, atmn_quantize, cupy_backend, spike_counts

g = torch.Generator(device="cuda").manual_seed(0)
worst, cases = 0.0, 0
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for T, tau in ((1, 1.0), (4, 1.0), (4, 1.5), (8, 2.0), (16, math.inf), (100, 1.0)):
        for shape, per_channel in (((257,), False), ((3, 129, 64), True), ((1000, 33), True)):
            C = shape[-1]
            if per_channel:
                V = torch.rand(C, device="cuda", generator=g) + 0.2
            else:
                V = torch.tensor(0.4, device="cuda")
            V = V.requires_grad_()
            x = (torch.randn(*shape, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
            p = ATMNParameters(V, tau=tau)
            w = torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64)
            ref, spikes = atmn_quantize(x, T, p, backend="torch")
            ref_g = torch.autograd.grad((ref.double() * w).sum(), (x, V))
            out, counts = cupy_backend.atmn_quantize_cupy(x, T, p, counts=True)
            out_g = torch.autograd.grad((out.double() * w).sum(), (x, V))
            case = str((dtype, T, tau, shape))
            assert torch.equal(counts, spike_counts(spikes, per_channel=per_channel)), case
            half = dtype != torch.float32
            torch.testing.assert_close(out, ref, rtol=1e-2 if half else 1e-6, atol=1e-6, msg=case)
            n = math.prod(shape) * T // V.numel()
            for a, b in zip(ref_g, out_g, strict=True):
                tol = (1e-2 if half else 1e-5) * (math.sqrt(n) if a.shape == V.shape else 1)
                torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=case)
                if not half:
                    worst = max(worst, float(((b - a).abs() / (a.abs() + 1)).max()))
            cases += 1
print(f"fused spike point = reference in {cases} cases (float32 gradients within {worst:.1e})")
EOF

step "no host syncs on the GPU" 120 python3 - <<'EOF'
import torch

from spikemar.models import MARLM, MARConfig, SpikeConfig
from spikemar.neurons import ATMN, cupy_backend, raise_deferred_errors, value_checks


def no_sync(what, fn):
    fn()  # warm-up: builds the kernels, allocates
    torch.cuda.synchronize()
    with value_checks("deferred"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    raise_deferred_errors()  # the one read of the step
    print(f"{what}: no synchronising call")


x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
for backend in ("cupy", "torch"):
    n = ATMN(tau=1.5, v_threshold=0.5, num_channels=256, step_mode="m", backend=backend).cuda()

    def neuron(n=n):
        n.reset()
        n(x).sum().backward()
        n.reset()
        n.quantize(x[0].detach(), 4)

    no_sync(f"ATMN backend={backend}: forward, backward and quantize", neuron)


def spike_point():
    out, _ = cupy_backend.atmn_quantize_cupy(x[0], 4, n.parameters_tuple(), counts=True)
    out.sum().backward()


no_sync("the fused spike point (with its spike counts): forward and backward", spike_point)
model = MARLM(MARConfig(vocab_size=65, d_model=64, n_layers=2, spikes=SpikeConfig(T=4))).cuda()
tokens = torch.randint(0, 65, (4, 65), device="cuda")


def training_step():
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()


no_sync("a spiking MAR training step (forward, loss, backward)", training_step)
EOF

step "bench_neuron float32" 300 python3 benchmarks/bench_neuron.py --device cuda --T 4 8 16 --N 65536 1048576 4194304 --no-progress --json "$OUT/bench_neuron_f32.json"

step "bench_neuron float16, T=4, N=2^22" 120 python3 benchmarks/bench_neuron.py --device cuda --T 4 --N 4194304 --dtype float16 --no-progress --json "$OUT/bench_neuron_f16.json"

step "MAR training step per backend beside its dense twin" 180 python3 benchmarks/bench_train_step.py --device cuda --no-progress --json "$OUT/bench_train_step.json"

step "bf16 autocast training" 180 python3 -m spikemar train --device cuda --amp bf16 --model mar --steps 50 --eval-interval 50 --d-model 64 --n-layers 2 --data "$DATA" --out /tmp/gpu_check_mar.pt --overwrite --no-progress

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step "2-process nccl distillation" 240 bash -c 'python3 -m spikemar train --device cuda --model mar-dense --steps 30 --eval-interval 30 --d-model 64 --n-layers 2 --data "$0" --out /tmp/gpu_check_dense.pt --overwrite --no-progress && torchrun --nproc-per-node 2 -m spikemar distill --stage 2 --device cuda --teacher /tmp/gpu_check_dense.pt --steps 30 --eval-interval 30 --data "$0" --out /tmp/gpu_check_student.pt --overwrite --no-progress' "$DATA"
fi

if [ -z "${SPIKEMAR_NVRTC:-}" ]; then # the toolkit's NVRTC for the compile checks, if any
  nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -n 1)
  [ -n "$nvrtc" ] && export SPIKEMAR_NVRTC=$nvrtc
fi
step "CUDA checks without a GPU, here (emulation, NVRTC, host syncs)" 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_host_syncs.py

echo "results: $LOG"
exit "$failed"
