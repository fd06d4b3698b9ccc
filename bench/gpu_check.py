"""One-shot GPU check (issue 24): build and verify every CUDA path of keepbits in one short run.

    bench/gpu_check.sh OUT_DIR                                  # the GPU machine, repository root
    python bench/gpu_check.py --out DIR [--dry-run] [--tiny] [--deadline-s 420] [--only STEP,...]

Steps, in this order, each in a process of its own with a time budget, under one global
deadline (``--deadline-s``); ``OUT/gpu_check.json`` is rewritten after every step, so a step that
fails, hangs or leaves the CUDA context broken costs only its own entry:

1. ``probe``: versions, tools, the GPU.
2. ``build``: ``native/build.sh --cuda --offline`` with ``CUDAARCHS=90`` (``--cuda-arch``) into
   its own folder; log in ``OUT/build.log``. Without ONNX Runtime headers on the machine it builds
   the CUDA kernels, ``keepbits_cuda_test`` and ``libkeepbits_cuda_c.so`` (C entry points).
3. ``compile_check``: the ONNX Runtime CUDA ops and the TensorRT plugin, where the build could not
   compile them: the headers each source misses (``c++ -M -MG``), else ``nvcc -c``. Neither can
   run on the GPU machine (ONNX Runtime there is the CPU build; no TensorRT).
4. ``kernel_correctness``: ``keepbits_cuda_test`` (CUDA vs the CPU kernels, values whose bits
   differ) and the kernels through ctypes on torch CUDA tensors against ``keepbits.core`` (NICE
   Eqs. 11–12) on random shapes incl. odd H×W, b ∈ {1, 2, 3, 8, 16, max(H, W), more}, fused and
   unfused: max abs error ≤ 1e-5, every output written (outputs poisoned with NaN first), and
   x̃ = x bit for bit at b = 1 (as the CPU kernels give).
5. ``kernel_speed``: fused ``keepbits_cuda_mask_compose`` vs the same math in torch CUDA ops
   (``keepbits.training.functional``) at 8×3×224² and 256×3×224², b = 8: CUDA events per call,
   warm-up, median of ``--reps`` (≥ 50), inputs rotated over sets larger than the L2 cache.
6. ``nice_first_step``: one NICE loss + backward (Eq. 10, deterministic ẑ of Eq. 11 in place of
   the sampled gate, whose noise each device draws from its own generator) on the same batch and
   weights on CPU and CUDA: loss and generator gradient agree (float32, TF32 off), images/s.
7. ``train_classifier``: ``torchrun --nproc-per-node 1 keepbits train classifier`` on CUDA,
   images/s of the steady epochs (synthetic 224-px data).
8. ``train_nice``: ``train_nice`` on CUDA (needs ``NiceConfig.device``): first-step loss vs CPU
   and images/s.
9. ``train_density_simplebits``: ``train_density`` and ``train_simplebits`` (against that density)
   on CUDA at toy sizes: finite metrics, checkpoints rebuilt on the CPU give finite outputs.
10. ``audit_sis``: exact BackSelect (plain on ResNet-20; incremental on a plain CNN chain, as the
   incremental scorer takes no residual nets) and batched-gradient BackSelect on ResNet-20, CPU vs
   CUDA (needs ``device=``): same orders, seconds per image.
11. ``audit_cid``: CID of one image at one ResNet-20 layer, CPU vs CUDA (needs ``device=``).

Without a CUDA device (or with ``--dry-run``) every GPU part is recorded as ``skipped: <reason>``;
the CPU references still run (at ``--tiny`` sizes in seconds). Entries carry ``status``: ``ok``,
``skipped: <reason>`` or ``failed: <first line of the error>``. Models are random-initialised and
data synthetic: no data set or weights are needed on the machine. Exit code 1 when a step failed.
``--only`` reruns chosen steps (the probe always runs; without ``build`` among them, the
libraries an earlier run left in ``--build-dir`` are used).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_results when imported as a module too
from _results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: max abs error of the CUDA kernels against keepbits.core (as tests/test_native.py for the CPU kernels)
KERNEL_TOL = 1e-5
#: CPU vs CUDA, float32 with TF32 off: relative error of the NICE loss and of the generator gradient
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3
SIS_THRESHOLDS = (0.5, 0.7, 0.9)
#: seconds a child needs at least to be worth starting, and kept free before the deadline
MIN_STEP_S, RESERVE_S = 10.0, 5.0
LIB = "libkeepbits_cuda_c.so"
ARTIFACTS = (LIB, "keepbits_cuda_test", "libkeepbits_ort_cuda.so", "libkeepbits_ort.so", "libkeepbits_trt.so")


# --------------------------------------------------------------------------- helpers
class CheckFailed(Exception):
    """A check ran and its result is outside the bound (the figures are in the entry)."""


def failed(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def takes_device(obj: Any) -> bool:
    """Whether a function, class or config dataclass accepts ``device``."""
    if dataclasses.is_dataclass(obj):
        return any(f.name == "device" for f in dataclasses.fields(obj))
    try:
        return "device" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def lacks_device(where: str) -> str:
    return f"skipped: api lacks device= ({where} takes no 'device' argument)"


def run_group(cmd: list[str], log: Any, timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` from the repository root in a session of its own, output to the open file
    ``log``; at ``timeout`` kill the whole process group (compilers, torchrun workers). Exit
    code, or None when killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run ``cmd`` (see :func:`run_group`), appending its output to ``log``; (exit code, 124 when
    killed at ``timeout``; seconds)."""
    started = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = run_group(cmd, fh, timeout, env)
        if rc is None:
            fh.write(f"[timed out after {timeout:.0f} s]\n")
    return (124 if rc is None else rc), round(time.perf_counter() - started, 2)


def last_error_line(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.is_file() else []
    errors = [l for l in lines if "error" in l.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_npz(path: Path, count: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """Random uint8 N×size×size×3 images, labels cycling over ``classes`` (made once per run)."""
    import numpy as np

    if not path.is_file():
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        np.savez(path, x=x, y=np.arange(count) % classes, class_names=np.array([str(i) for i in range(classes)]))
    return path


def classifier_arch() -> str:
    """EfficientNet-Lite0 once it is registered, else ResNet-18 (224-px classifiers)."""
    from keepbits import registry

    return next((n for n in registry.names("classifier") if "lite0" in n.lower()), "resnet18")


def random_classifier_checkpoint(path: Path, arch: str, size: int, classes: int = 10, seed: int = 0) -> Path:
    """A ``classifier`` checkpoint of a random-initialised ``arch`` (NICE needs one to train against)."""
    import torch

    from keepbits import registry
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"in_channels": 3, "num_classes": classes, "image_size": [size, size]}
    model = registry.build(arch, **kwargs)
    save_checkpoint(path, Checkpoint(
        kind="classifier", models={"classifier": ModelEntry.of(arch, kwargs, model)}, input_shape=[3, size, size],
        normalization=Normalization([0.5] * 3, [0.25] * 3), class_names=[str(i) for i in range(classes)],
        command="bench/gpu_check.py (random initialisation)", epoch=0,
    ))
    return path


class CudaKernels:
    """``libkeepbits_cuda_c.so`` (``native/cuda/keepbits_cuda_c.cu``) through ctypes, on contiguous
    float32 torch CUDA tensors, on torch's current stream."""

    def __init__(self, path: str):
        import ctypes

        lib = ctypes.CDLL(path)
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        signatures = {
            "keepbits_cuda_workspace_bytes": (i64, [i64] * 5),
            "keepbits_cuda_hard_concrete": (ctypes.c_int, [ptr, ptr, i64, f32, f32, f32, ptr]),
            "keepbits_cuda_mixed_res": (ctypes.c_int, [ptr, ptr, ptr] + [i64] * 5 + [ptr, ptr]),
            "keepbits_cuda_mask_compose": (ctypes.c_int, [ptr] * 4 + [i64] * 5 + [f32] * 3 + [ptr, ptr]),
            "keepbits_cuda_error_string": (ctypes.c_char_p, [ctypes.c_int]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.lib = lib

    @staticmethod
    def _ptr(t: Any) -> int:
        import torch

        if not (t.is_cuda and t.dtype == torch.float32 and t.is_contiguous()):
            raise ValueError("expected a contiguous float32 CUDA tensor")
        return t.data_ptr()

    @staticmethod
    def _stream() -> int:
        import torch

        return torch.cuda.current_stream().cuda_stream

    def _check(self, code: int, what: str) -> None:
        if code:
            raise RuntimeError(f"{what}: {self.lib.keepbits_cuda_error_string(code).decode()}")

    def workspace(self, x: Any, b: int) -> Any:
        import torch

        size = self.lib.keepbits_cuda_workspace_bytes(*x.shape, b)
        if size < 0:
            raise ValueError(f"invalid shape {tuple(x.shape)} / b={b}")
        return torch.empty(max(size, 1), dtype=torch.uint8, device=x.device)

    def hard_concrete(self, log_alpha: Any, mask: Any, gate: tuple[float, float, float]) -> None:
        self._check(self.lib.keepbits_cuda_hard_concrete(self._ptr(log_alpha), self._ptr(mask), log_alpha.numel(), *gate,
                                                         self._stream()), "hard_concrete")

    def mixed_res(self, x: Any, mask: Any, mixed: Any, b: int, workspace: Any) -> None:
        self._check(self.lib.keepbits_cuda_mixed_res(self._ptr(x), self._ptr(mask), self._ptr(mixed), *x.shape, b,
                                                     workspace.data_ptr(), self._stream()), "mixed_res")

    def mask_compose(self, log_alpha: Any, x: Any, mask: Any, mixed: Any, b: int, gate: tuple[float, float, float], workspace: Any) -> None:
        self._check(self.lib.keepbits_cuda_mask_compose(self._ptr(log_alpha), self._ptr(x), self._ptr(mask), self._ptr(mixed),
                                                        *x.shape, b, *gate, workspace.data_ptr(), self._stream()), "mask_compose")


def cuda_times_ms(fn: Callable[[int], Any], sets: int, warmup: int, reps: int) -> dict[str, float]:
    """CUDA-event times of ``fn(i % sets)`` after ``warmup`` calls: per call (median, p10, p90 of
    ``reps``; includes any wait for the host to enqueue), and the mean over a burst of ``reps``
    back-to-back calls between one pair of events (ms)."""
    import torch

    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps + 1)]
    for i, (start, stop) in enumerate(events[:reps]):
        start.record()
        fn(i % sets)
        stop.record()
    burst_start, burst_stop = events[reps]
    burst_start.record()
    for i in range(reps):
        fn(i % sets)
    burst_stop.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(stop) for start, stop in events[:reps])
    return {"median_ms": round(statistics.median(times), 4), "p10_ms": round(times[len(times) // 10], 4),
            "p90_ms": round(times[(9 * len(times)) // 10], 4), "burst_mean_ms": round(burst_start.elapsed_time(burst_stop) / reps, 4),
            "reps": reps}


def compare_orders(cpu: Any, gpu: Any) -> dict[str, Any]:
    """Two BackSelect results of one image: same order? first differing step, same SIS per τ."""
    import numpy as np

    from keepbits.audit import find_sis

    diff = np.flatnonzero(cpu.order != gpu.order)
    same_sis = {}
    for tau in SIS_THRESHOLDS:
        a, b = find_sis(cpu, tau), find_sis(gpu, tau)
        same_sis[str(tau)] = (a is None and b is None) or (a is not None and b is not None and np.array_equal(np.sort(a), np.sort(b)))
    return {"order_identical": not len(diff), "first_difference_step": int(diff[0]) + 1 if len(diff) else None,
            "sis_identical": same_sis}


# --------------------------------------------------------------------------- steps
# Each step fills ``entry`` (saved with ``save()`` after each part, so a timeout keeps what was
# done) and may put values for later steps under entry["context"].

def step_probe(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import platform

    tools = {name: shutil.which(name) for name in ("nvcc", "cmake", "c++", "nvidia-smi", "cuobjdump")}
    entry["python"] = platform.python_version()
    entry["tools"] = tools
    if tools["nvcc"]:
        out = subprocess.run([tools["nvcc"], "--version"], capture_output=True, text=True, timeout=30).stdout
        entry["nvcc"] = next((l.strip() for l in out.splitlines() if "release" in l), out.strip()[-200:])
    if tools["nvidia-smi"]:
        out = subprocess.run([tools["nvidia-smi"], "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        entry["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()[:300]
    save()
    import numpy
    import torch

    entry["versions"] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": numpy.__version__,
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import onnxruntime

        entry["onnxruntime"] = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    except ImportError as exc:
        entry["onnxruntime"] = failed(exc)
    entry["tensorrt_module"] = importlib.util.find_spec("tensorrt") is not None
    cuda = torch.cuda.is_available()
    if cuda:
        p = torch.cuda.get_device_properties(0)
        entry["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                        "multiprocessors": p.multi_processor_count, "l2_bytes": getattr(p, "L2_cache_size", None)}
    entry["torch_cuda_available"] = cuda
    entry["context"] = {"torch_cuda": cuda, "nvcc": tools["nvcc"], "cuobjdump": tools["cuobjdump"],
                        "l2_bytes": entry.get("gpu", {}).get("l2_bytes"), "tensorrt": entry["tensorrt_module"],
                        "ort_providers": entry["onnxruntime"].get("providers") if isinstance(entry["onnxruntime"], dict) else None}


def step_build(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    build = Path(ctx["build_dir"])
    log = Path(ctx["out"]) / "build.log"
    env = {**os.environ, "CUDAARCHS": ctx["cuda_arch"], "KEEPBITS_NATIVE_BUILD_DIR": str(build),
           "KEEPBITS_BUILD_JOBS": str(os.cpu_count() or 2)}
    entry["command"] = f"CUDAARCHS={ctx['cuda_arch']} KEEPBITS_NATIVE_BUILD_DIR={build} bash native/build.sh --cuda --offline"
    rc, seconds = run_logged(["bash", "native/build.sh", "--cuda", "--offline"], log, ctx["budget_s"] - 5, env)
    entry.update(exit_code=rc, seconds_build=seconds, log="build.log")
    artifacts = {name: str(build / name) for name in ARTIFACTS if (build / name).is_file()}
    entry["built"] = sorted(artifacts)
    cache = (build / "CMakeCache.txt").read_text(errors="replace") if (build / "CMakeCache.txt").is_file() else ""
    ort_on = re.search(r"^KEEPBITS_ORT:BOOL=(\w+)", cache, re.M)
    entry["not_built"] = {}
    if ort_on and ort_on.group(1).upper() == "OFF":
        entry["not_built"]["libkeepbits_ort_cuda.so"] = "no ONNX Runtime headers on this machine (build.sh --offline builds the CUDA kernels only)"
    if "libkeepbits_trt.so" not in artifacts:
        entry["not_built"]["libkeepbits_trt.so"] = "TensorRT headers/library not found (TENSORRT_INCLUDE_DIR)"
    if ctx.get("cuobjdump") and LIB in artifacts:
        out = subprocess.run([ctx["cuobjdump"], "--list-elf", artifacts[LIB]], capture_output=True, text=True, timeout=60).stdout
        entry["sass_targets"] = sorted(set(re.findall(r"sm_\d+", out)))
    entry["context"] = {"artifacts": artifacts}
    if rc != 0:
        raise RuntimeError(f"native/build.sh exited with {rc}: {last_error_line(log)}")
    if LIB not in artifacts:
        raise RuntimeError(f"native/build.sh succeeded but {LIB} is missing")


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include folders nvcc passes to the host compiler (from ``nvcc --dryrun``)."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True,
                         timeout=60)
    found = re.findall(r'(?:-I|-isystem"?\s+)"?([^"\s]+)"?', out.stdout + out.stderr)
    return [d for d in dict.fromkeys(found) if Path(d).is_dir()]


def missing_headers(source: Path, includes: list[str]) -> list[str]:
    """Headers ``source`` includes (directly or through found headers) that no include folder holds."""
    # -M, not -MM: with -MM, gcc leaves missing <...> headers out of the list
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-M", "-MG", *[f"-I{d}" for d in includes], str(source)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"dependency scan of {source.name} failed: {(out.stderr.strip().splitlines() or ['?'])[0]}")
    deps = out.stdout.split(":", 1)[1].replace("\\\n", " ").split()
    return [d for d in deps if not (ROOT / d).is_file() and not Path(d).is_file()]


#: source and the library the build makes of it
COMPILE_ONLY = {
    "ort_cuda_ops": ("native/cuda/keepbits_ort_cuda.cc", "libkeepbits_ort_cuda.so"),
    "tensorrt_plugin": ("native/cuda/keepbits_trt_plugin.cc", "libkeepbits_trt.so"),
}


def why_not_run(name: str, ctx: dict) -> str:
    """Why this check does not run a compile-only part (from the probe's findings)."""
    if name == "tensorrt_plugin":
        return "not run: no TensorRT" + ("" if ctx.get("tensorrt") else " (the tensorrt module is not installed)")
    providers = ctx.get("ort_providers") or []
    if "CUDAExecutionProvider" not in providers:
        return f"not run: onnxruntime has no CUDAExecutionProvider (providers: {', '.join(providers) or 'none'})"
    return "not run: this check runs the kernels through libkeepbits_cuda_c.so, not through ONNX Runtime"


def step_compile_check(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    includes = cuda_include_dirs(ctx["nvcc"]) + [str(ROOT / "native" / "cuda"), str(ROOT / "native")]
    includes += [os.environ[v] for v in ("ONNXRUNTIME_INCLUDE_DIR", "TENSORRT_INCLUDE_DIR") if os.environ.get(v)]
    entry["include_dirs"] = includes
    work = Path(ctx["work"])
    for name, (source, library) in COMPILE_ONLY.items():
        part: dict[str, Any] = {"source": source, "run": why_not_run(name, ctx)}
        if library in ctx.get("artifacts", {}):
            part["status"] = f"ok: compiled and linked by native/build.sh ({library})"
        else:
            missing = missing_headers(ROOT / source, includes)
            part["missing_headers"] = missing
            if missing:
                part["status"] = f"skipped: missing headers: {', '.join(missing)}"
            else:
                rc, seconds = run_logged([ctx["nvcc"], "-std=c++17", "-c", source, "-o", str(work / f"{name}.o"),
                                          *[f"-I{d}" for d in includes]], Path(ctx["out"]) / "build.log", 120)
                part["status"] = "ok: compiled (nvcc -c)" if rc == 0 else f"failed: nvcc -c exited with {rc} (build.log)"
                part["seconds"] = seconds
        entry[name] = part
        save()
    statuses = [entry[n]["status"] for n in COMPILE_ONLY]
    if any(s.startswith("failed") for s in statuses):
        raise CheckFailed("a compile check failed")
    if all(s.startswith("skipped") for s in statuses):
        entry["status"] = "skipped: " + "; ".join(f"{n}: {s.split(': ', 1)[1]}" for n, s in zip(COMPILE_ONLY, statuses))


def kernel_cases(rng: Any, tiny: bool) -> list[tuple[int, int, int, int, int]]:
    """(n, c, h, w, b) cases: odd and even sizes, one image up to 8, every kind of b."""
    sizes = [(5, 7), (1, 1), (int(rng.integers(2, 20)), int(rng.integers(2, 20)))] if tiny else \
        [(37, 51), (1, 1), (224, 224), (255, 257), (int(rng.integers(2, 100)), int(rng.integers(2, 100)))]
    cases = []
    for i, (h, w) in enumerate(sizes):
        for b in (1, 2, 3, 8, 16, max(h, w), max(h, w) + 5):
            cases.append((int(rng.integers(1, 9)), 1 if i == 0 and b == 3 else 3, h, w, b))
    return cases


def step_kernel_correctness(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import numpy as np
    import torch

    from keepbits.core import BETA, GAMMA, ZETA, deterministic_mask, mixed_resolution

    artifacts = ctx["artifacts"]
    problems = []
    if "keepbits_cuda_test" in artifacts:  # CUDA vs the CPU kernels (cpu/nice_kernels.h), in C++
        run = subprocess.run([artifacts["keepbits_cuda_test"], str(ctx["seed"])], capture_output=True, text=True, timeout=120)
        lines = [l for l in run.stdout.splitlines() if l.startswith("{")]
        part: dict[str, Any] = json.loads(lines[-1]) if lines else {"output": (run.stdout + run.stderr)[-500:]}
        part["exit_code"] = run.returncode
        part["status"] = "ok" if run.returncode == 0 else f"failed: exit code {run.returncode}"
        entry["cuda_vs_cpu_kernels"] = part
        if run.returncode:
            problems.append("keepbits_cuda_test")
        save()
    kernels = CudaKernels(artifacts[LIB])
    rng = np.random.default_rng(ctx["seed"])
    rows, worst = [], {"mask": 0.0, "mixed": 0.0}
    unwritten, b1_not_x = 0, 0
    for n, c, h, w, b in kernel_cases(rng, ctx["tiny"]):
        for fused in (True, False):
            beta = 0.5 if (h, w) == (1, 1) else BETA  # one size with a non-default temperature
            la = rng.normal(0.0, 3.0, (n, 1, h, w)).astype(np.float32)
            x = rng.random((n, c, h, w), dtype=np.float32)
            ref_mask = deterministic_mask(la, beta)
            ref_mixed = mixed_resolution(x, ref_mask, b)
            la_d, x_d = torch.from_numpy(la).cuda(), torch.from_numpy(x).cuda()
            mask_d = torch.full_like(la_d, float("nan"))
            mixed_d = torch.full_like(x_d, float("nan"))
            ws = kernels.workspace(x_d, b)
            gate = (beta, GAMMA, ZETA)
            if fused:
                kernels.mask_compose(la_d, x_d, mask_d, mixed_d, b, gate, ws)
            else:
                kernels.hard_concrete(la_d, mask_d, gate)
                kernels.mixed_res(x_d, mask_d, mixed_d, b, ws)
            torch.cuda.synchronize()
            mask, mixed = mask_d.cpu().numpy(), mixed_d.cpu().numpy()
            unwritten += int(np.isnan(mask).sum() + np.isnan(mixed).sum())
            err_mask = float(np.nanmax(np.abs(mask.astype(np.float64) - ref_mask))) if mask.size else 0.0
            err_mixed = float(np.nanmax(np.abs(mixed.astype(np.float64) - ref_mixed))) if mixed.size else 0.0
            worst["mask"], worst["mixed"] = max(worst["mask"], err_mask), max(worst["mixed"], err_mixed)
            if b == 1:
                b1_not_x += int((mixed.view(np.uint32) != x.view(np.uint32)).sum())
            rows.append([n, c, h, w, b, fused, beta, err_mask, err_mixed, round(float((mask == ref_mask).mean()), 4),
                         round(float((mixed == ref_mixed).mean()), 4)])
    entry["vs_numpy"] = {
        "columns": ["n", "c", "h", "w", "b", "fused", "beta", "mask_max_abs", "mixed_max_abs", "mask_identical_fraction",
                    "mixed_identical_fraction"],
        "cases": rows, "mask_max_abs": worst["mask"], "mixed_max_abs": worst["mixed"], "tolerance": KERNEL_TOL,
        "unwritten_values": unwritten, "b1_mixed_values_not_bitwise_x": b1_not_x,
    }
    if worst["mask"] > KERNEL_TOL or worst["mixed"] > KERNEL_TOL or unwritten or b1_not_x:
        problems.append("vs keepbits.core")
    if problems:
        raise CheckFailed(f"outside the bounds: {', '.join(problems)}")


def step_kernel_speed(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import torch

    from keepbits.core import BETA, GAMMA, ZETA
    from keepbits.training import functional as KF

    kernels = CudaKernels(ctx["artifacts"][LIB])
    b, gate = 8, (BETA, GAMMA, ZETA)
    shapes = [(2, 3, 16, 16)] if ctx["tiny"] else [(8, 3, 224, 224), (256, 3, 224, 224)]
    warmup, reps = (2, 5) if ctx["tiny"] else (10, ctx["reps"])
    l2 = ctx.get("l2_bytes") or 64 * 2**20
    gen = torch.Generator(device="cuda").manual_seed(ctx["seed"])
    entry.update(block_size=b, warmup=warmup, timing="CUDA events around each call; median of the calls",
                 torch_ops="keepbits.training.functional.deterministic_mask + mixed_resolution (float32)")
    for n, c, h, w in shapes:
        bytes_min = 4 * (2 * n * h * w + 2 * n * c * h * w)  # read log α and x, write ẑ and x̃
        sets = max(1, math.ceil(3 * l2 / bytes_min))  # rotate over more data than the L2 cache holds
        data = [(3 * torch.randn(n, 1, h, w, device="cuda", generator=gen), torch.rand(n, c, h, w, device="cuda", generator=gen))
                for _ in range(sets)]
        outs = [(torch.empty_like(la), torch.empty_like(x)) for la, x in data]
        ws = kernels.workspace(data[0][1], b)

        def fused(i: int) -> None:
            kernels.mask_compose(data[i][0], data[i][1], outs[i][0], outs[i][1], b, gate, ws)

        def torch_ops(i: int) -> Any:
            return KF.mixed_resolution(data[i][1], KF.deterministic_mask(data[i][0]), b)

        fused(0)
        agree = float((torch_ops(0) - outs[0][1]).abs().max())
        first = cuda_times_ms(fused, sets, warmup, reps)
        ops = cuda_times_ms(torch_ops, sets, warmup, reps)
        second = cuda_times_ms(fused, sets, warmup, reps)  # the same variant twice: the spread of the figure
        key = "x".join(map(str, (n, c, h, w)))
        entry[key] = {
            "input_sets": sets, "fused": first, "fused_again": second, "torch_ops": ops,
            "ratio_torch_over_fused": round(ops["median_ms"] / first["median_ms"], 2),
            "ratio_torch_over_fused_burst": round(ops["burst_mean_ms"] / first["burst_mean_ms"], 2),
            "fused_gb_per_s": round(bytes_min / (first["median_ms"] * 1e-3) / 1e9, 1), "bytes_min": bytes_min,
            "max_abs_fused_vs_torch": agree,
        }
        save()
        del data, outs
        torch.cuda.empty_cache()
        if agree > KERNEL_TOL:
            raise CheckFailed(f"{key}: fused kernel and torch ops differ by {agree:.3g}")


def nice_models(size: int, seed: int) -> tuple[Any, Any, str, str]:
    """(generator, frozen classifier in eval mode, names) random-initialised with ``seed``."""
    import torch

    from keepbits import registry
    from keepbits.training.nice import default_generator

    torch.manual_seed(seed)
    arch, gen_name = classifier_arch(), default_generator(size, size)
    classifier = registry.build(arch, in_channels=3, num_classes=10, image_size=[size, size]).eval().requires_grad_(False)
    generator = registry.build(gen_name, "generator", in_channels=3)
    return generator, classifier, arch, gen_name


class NiceStep:
    """One NICE loss (Eq. 10, λ1 = 1, λ2 = 0.1, deterministic ẑ) + backward of fixed weights and
    one batch, on one device (models and batch copied there once)."""

    def __init__(self, generator: Any, classifier: Any, x: Any, y: Any, block: int, device: str):
        self.gen = copy.deepcopy(generator).to(device).train()
        self.clf = copy.deepcopy(classifier).to(device).eval()
        self.x, self.y, self.block = x.to(device), y.to(device), block

    def __call__(self) -> tuple[dict[str, Any], Any]:
        """(loss parts, flattened generator gradient as float64 on the CPU)."""
        import torch

        from keepbits.training.functional import deterministic_mask, mixed_resolution
        from keepbits.training.nice import nice_loss

        self.gen.zero_grad(set_to_none=True)
        log_alpha = self.gen(self.x)
        logits = self.clf(mixed_resolution(self.x, deterministic_mask(log_alpha), self.block))
        loss, parts = nice_loss(log_alpha, logits, self.y, 1.0, 0.1)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in self.gen.parameters() if p.grad is not None]).double().cpu()
        return {"loss": loss.item(), **parts}, grad

    def seconds_per_step(self, steps: int) -> float:
        """Wall time per step after two warm-up steps (cuDNN / oneDNN set-up), synchronised."""
        import torch

        def run(count: int) -> None:
            for _ in range(count):
                self()
            if self.x.is_cuda:
                torch.cuda.synchronize()

        run(2)
        return timed(lambda: run(steps))[1] / steps


def set_tf32(enabled: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def step_nice_first_step(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import torch

    size, batch, block, steps = (32, 4, 8, 1) if ctx["tiny"] else (224, 64, 8, 10)
    generator, classifier, arch, gen_name = nice_models(size, ctx["seed"])
    g = torch.Generator().manual_seed(ctx["seed"])
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    entry.update(classifier=arch, generator=gen_name, image_size=size, batch=batch, block_size=block,
                 gate="deterministic ẑ (Eq. 11) in place of the sampled z (Eq. 7), whose uniform noise each device draws itself")
    on_cpu = NiceStep(generator, classifier, x, y, block, "cpu")
    cpu, cpu_grad = on_cpu()
    cpu_s = on_cpu.seconds_per_step(1 if ctx["tiny"] else 2)
    entry["cpu"] = {"status": "ok", **cpu, "seconds_per_step": round(cpu_s, 3), "images_per_s": round(batch / cpu_s, 1),
                    "torch_threads": torch.get_num_threads()}
    save()
    if ctx["cuda_reason"]:
        entry["status"] = f"skipped: {ctx['cuda_reason']} (CPU reference computed)"
        return
    on_gpu = NiceStep(generator, classifier, x, y, block, "cuda")
    for label, tf32 in (("cuda_fp32", False), ("cuda_tf32", True)):
        set_tf32(tf32)
        gpu, gpu_grad = on_gpu()
        part = {**gpu, "loss_rel_diff": abs(gpu["loss"] - cpu["loss"]) / abs(cpu["loss"]),
                "grad_rel_diff": float((gpu_grad - cpu_grad).norm() / cpu_grad.norm())}
        seconds = on_gpu.seconds_per_step(steps)
        part.update(seconds_per_step=round(seconds, 4), images_per_s=round(batch / seconds, 1), speedup_vs_cpu=round(cpu_s / seconds, 1))
        entry[label] = part
        save()
    entry["tolerance"] = {"loss_rel": LOSS_RTOL, "grad_rel": GRAD_RTOL, "applies_to": "cuda_fp32"}
    strict = entry["cuda_fp32"]
    if strict["loss_rel_diff"] > LOSS_RTOL or strict["grad_rel_diff"] > GRAD_RTOL:
        raise CheckFailed(f"CPU vs CUDA (TF32 off): loss rel {strict['loss_rel_diff']:.3g}, gradient rel {strict['grad_rel_diff']:.3g}")


def epoch_rates(history: list[dict[str, Any]], images: int) -> dict[str, Any]:
    """Images/s per epoch and over the epochs after the first (no start-up), from the cumulative
    ``elapsed_s`` (0.1 s steps) of a trainer's history."""
    elapsed = [row["elapsed_s"] for row in history]
    spans = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    steady = elapsed[-1] - elapsed[0]
    return {"images_per_s_by_epoch": [round(images / s, 1) if s > 0 else None for s in spans],
            "images_per_s_after_epoch_1": round(images * (len(elapsed) - 1) / steady, 1) if len(elapsed) > 1 and steady > 0 else None}


def step_train_classifier(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    from keepbits.training.checkpoint import load_checkpoint

    size, count, batch, epochs = (32, 64, 16, 2) if ctx["tiny"] else (224, 2048, 128, 4)
    arch = classifier_arch()
    work = Path(ctx["work"])
    data = synthetic_npz(work / f"train_{size}_{count}.npz", count, size)
    out = work / "classifier"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "-m", "keepbits", "-q", "train", "classifier", "--data", str(data), "--arch", arch, "--out", str(out),
           "--epochs", str(epochs), "--batch-size", str(batch), "--val-fraction", "0", "--augment", "crop-flip"]
    entry.update(arch=arch, image_size=size, images=count, batch=batch, epochs=epochs,
                 command="torchrun --nproc-per-node 1 -m keepbits -q train classifier " + " ".join(cmd[cmd.index("--data"):]))
    rc, seconds = run_logged(cmd, Path(ctx["out"]) / "steps.log", ctx["budget_s"] - 10)
    entry.update(exit_code=rc, seconds_total=seconds)
    if rc != 0:
        raise RuntimeError(f"torchrun exited with {rc} (steps.log)")
    metrics = load_checkpoint(out / "last.pt", "classifier").metrics
    entry.update(world_size=metrics["world_size"], **epoch_rates(metrics["history"], count), note="per-epoch wall time of the trainer: CPU-side batching and "
                 "augmentation, transfer, step and checkpoint; epoch 1 includes CUDA/cuDNN start-up. "
                 "WORLD_SIZE=1 starts no process group, so the nccl backend itself is not exercised (one GPU cannot host two nccl ranks)")


def step_train_nice(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    from keepbits.training.nice import NiceConfig, train_nice

    if not takes_device(NiceConfig):
        entry["status"] = lacks_device("keepbits.training.nice.NiceConfig")
        return
    size, count, batch, epochs = (32, 16, 4, 2) if ctx["tiny"] else (224, 1024, 64, 3)
    work = Path(ctx["work"])
    arch = classifier_arch()
    data = synthetic_npz(work / f"train_{size}_{count}.npz", count, size)
    ckpt = random_classifier_checkpoint(work / f"classifier_{arch}_{size}.pt", arch, size, seed=ctx["seed"])
    base = dict(data=str(data), classifier=str(ckpt), block_size=8, batch_size=batch, seed=ctx["seed"], progress=False)
    entry.update(classifier=arch, image_size=size, images=count, batch=batch, epochs=epochs)
    first = {}
    for device in ("cpu", "cuda"):
        summary = train_nice(NiceConfig(overwrite=True, out=str(work / f"nice_first_{device}"), epochs=1, max_train=batch, device=device, **base))
        first[device] = summary["history"][0]["train_loss"]
    entry["first_step_loss"] = {**first, "rel_diff": abs(first["cuda"] - first["cpu"]) / abs(first["cpu"]),
                                "note": "sampled gates (Eq. 7): equal only if both devices draw the same noise"}
    save()
    summary = train_nice(NiceConfig(overwrite=True, out=str(work / "nice_cuda"), epochs=epochs, device="cuda", **base))
    entry.update(epoch_rates(summary["history"], count))


def step_train_density_simplebits(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    """``train density`` then ``train simplebits`` (against that density) on CUDA, tiny: both finish
    with finite metrics and their checkpoints rebuild on the CPU with finite outputs."""
    import math

    import torch

    from keepbits.training.density import DensityConfig, load_density, train_density
    from keepbits.training.simplebits import SimpleBitsConfig, load_simplebits, train_simplebits

    size, count, steps = (16, 32, 3) if ctx["tiny"] else (32, 512, 40)
    work = Path(ctx["work"])
    data = synthetic_npz(work / f"train_{size}_{count}.npz", count, size)
    density = train_density(DensityConfig(overwrite=True, data=str(data), out=str(work / "density_cuda.pt"), levels=2, depth=2, hidden=16, steps=steps,
                                          batch_size=16, warmup_steps=1, eval_images=16, seed=ctx["seed"], device="cuda"))
    flow = load_density(density["checkpoint"])  # on the CPU
    entry["density"] = {"steps_run": density["steps_run"], "test_bpd": density["test_bpd"], "seconds": round(density["wall_time_s"], 2),
                        "cpu_reload_bpd": float(flow.bpd(torch.rand(2, 3, size, size)).mean())}
    save()
    simple = train_simplebits(SimpleBitsConfig(overwrite=True, data=str(data), out=str(work / "simplebits_cuda.pt"), density=density["checkpoint"],
                                               arch="lenet5", unet_base=4, steps=steps, batch_size=8, max_test=16, seed=ctx["seed"],
                                               device="cuda"))
    simplifier, classifier, _ = load_simplebits(simple["checkpoint"])  # on the CPU
    x = torch.rand(2, 3, size, size)
    entry["simplebits"] = {**{k: simple["metrics"][k] for k in ("acc_orig", "acc_sim", "bpd_orig", "bpd_sim")},
                           "seconds": round(simple["metrics"]["wall_time_s"], 2),
                           "cpu_reload_finite": bool(torch.isfinite(classifier(simplifier(x))).all())}
    figures = [entry["density"]["test_bpd"], entry["density"]["cpu_reload_bpd"],
               *(entry["simplebits"][k] for k in ("acc_orig", "acc_sim", "bpd_orig", "bpd_sim"))]
    if not (all(math.isfinite(v) for v in figures) and entry["simplebits"]["cpu_reload_finite"]):
        raise CheckFailed(f"a non-finite result from the CUDA runs: {entry}")


def chain_cnn(size: int) -> Any:
    """A plain conv chain (incremental BackSelect takes chains, not residual nets)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * ((size - 4) // 2) ** 2, 10))


def step_audit_sis(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import numpy as np
    import torch

    from keepbits import registry
    from keepbits.audit import TorchAdapter, backselect, gradient_backselect

    api = {"backselect": takes_device(backselect), "gradient_backselect": takes_device(gradient_backselect)}
    gpu_ok = not ctx["cuda_reason"]
    if gpu_ok and not any(api.values()):  # nothing would run on CUDA: spend no device time on the CPU side
        entry["status"] = lacks_device("keepbits.audit.sis.backselect / gradient_backselect")
        return
    tiny = ctx["tiny"]
    plain_size, chain_size, grad_size, grad_images, k = (5, 8, 8, 2, 2) if tiny else (16, 32, 32, 4, 4)
    torch.manual_seed(ctx["seed"])
    resnet = registry.build("resnet20", num_classes=10).eval()
    chain = chain_cnn(chain_size).eval()
    rng = np.random.default_rng(ctx["seed"])
    try:  # what the incremental scorer says about ResNet-20
        backselect(TorchAdapter(resnet, (3, 4, 4)), rng.normal(size=(3, 4, 4)).astype(np.float32), method="incremental")
        entry["incremental_resnet20"] = "supported"
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        entry["incremental_resnet20"] = failed(exc).replace("failed: ", "not supported: ", 1)
    entry["data"] = "random-initialised models (seeded), random normal images on the normalised scale"
    cases = [("plain", resnet, "resnet20", plain_size, 1), ("incremental", chain, "chain_cnn", chain_size, 1),
             ("gradient", resnet, "resnet20", grad_size, grad_images)]
    problems = []
    for method, net, name, size, images in cases:
        fn_name = "gradient_backselect" if method == "gradient" else "backselect"
        x = rng.normal(size=(images, 3, size, size)).astype(np.float32)

        def run(device: str | None) -> list[Any]:
            model = TorchAdapter(copy.deepcopy(net), (3, size, size))  # a device run may move its module
            extra = {} if device is None else {"device": device}
            if method == "gradient":
                return gradient_backselect(model, x, k=k, **extra)
            return [backselect(model, x[0], method=method, **extra)]

        part: dict[str, Any] = {"model": name, "image_size": size, "images": images, **({"k": k} if method == "gradient" else {})}
        cpu = run(None)
        part["cpu_seconds_per_image"] = round(float(np.mean([r.seconds for r in cpu])), 3)
        part["method_used"] = cpu[0].method
        if not gpu_ok:
            part["status"] = f"skipped: {ctx['cuda_reason']} (CPU reference computed)"
        elif not api[fn_name]:
            part["status"] = lacks_device(f"keepbits.audit.sis.{fn_name}")
        else:
            gpu = run("cuda")
            part["cuda_seconds_per_image"] = round(float(np.mean([r.seconds for r in gpu])), 3)
            part["speedup_vs_cpu"] = round(part["cpu_seconds_per_image"] / max(part["cuda_seconds_per_image"], 1e-9), 1)
            part["vs_cpu"] = [compare_orders(a, b) for a, b in zip(cpu, gpu)]
            exact = method != "gradient"  # float64 margins with a tie rule; the gradient ranking is float32
            same = all(c["order_identical"] for c in part["vs_cpu"])
            part["status"] = "ok" if same or not exact else "failed: CUDA order differs from the CPU order"
            if exact and not same:
                problems.append(method)
        entry[method] = part
        save()
    if not gpu_ok:
        entry["status"] = f"skipped: {ctx['cuda_reason']} (CPU reference computed)"
    elif problems:
        raise CheckFailed(f"exact BackSelect orders differ between CPU and CUDA: {', '.join(problems)}")


def step_audit_cid(ctx: dict, entry: dict, save: Callable[[], None]) -> None:
    import numpy as np
    import torch

    from keepbits import registry
    from keepbits.audit.cid import CIDConfig, CIDExplainer, default_layers

    in_init, in_config = takes_device(CIDExplainer), takes_device(CIDConfig)
    gpu_ok = not ctx["cuda_reason"]
    if gpu_ok and not (in_init or in_config):
        entry["status"] = lacks_device("keepbits.audit.cid.CIDExplainer / CIDConfig")
        return
    size = 8 if ctx["tiny"] else 32
    settings = dict(max_steps=20, min_steps=5, check_every=5, final_samples=4, xi_samples=2) if ctx["tiny"] else {}
    torch.manual_seed(ctx["seed"])
    net = registry.build("resnet20", num_classes=10).eval()
    layers = default_layers(net)
    layer = layers[len(layers) // 2]
    x = np.random.default_rng(ctx["seed"]).normal(size=(1, 3, size, size)).astype(np.float32)
    entry.update(model="resnet20", layer=layer, image_size=size, settings=settings or "CIDConfig defaults")

    def run(device: str | None) -> tuple[Any, float]:
        config = CIDConfig(**settings, **({"device": device} if device and in_config else {}))
        extra = {"device": device} if device and in_init else {}
        explainer = CIDExplainer(copy.deepcopy(net), layers=[layer], config=config, input_shape=(3, size, size), **extra)
        maps, seconds = timed(lambda: explainer.explain(x, batch_size=1))
        return maps[0], seconds

    cpu, cpu_s = run(None)
    entry["cpu"] = {"status": "ok", "seconds": round(cpu_s, 2), "cid": float(cpu.cid[0]), "ratio": float(cpu.ratio[0]),
                    "reached": bool(cpu.reached[0]), "steps": int(cpu.steps[0])}
    save()
    if not gpu_ok:
        entry["status"] = f"skipped: {ctx['cuda_reason']} (CPU reference computed)"
        return
    gpu, gpu_s = run("cuda")
    a, b = cpu.entropy.ravel().astype(np.float64), gpu.entropy.ravel().astype(np.float64)
    entry["cuda"] = {"status": "ok", "seconds": round(gpu_s, 2), "cid": float(gpu.cid[0]), "ratio": float(gpu.ratio[0]),
                     "reached": bool(gpu.reached[0]), "steps": int(gpu.steps[0]), "speedup_vs_cpu": round(cpu_s / gpu_s, 1),
                     "cid_rel_diff": abs(float(gpu.cid[0]) - float(cpu.cid[0])) / max(abs(float(cpu.cid[0])), 1e-12),
                     "map_correlation": float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None,
                     "note": "δ ~ N(0, I) comes from each device's generator: figures, not an identity check"}


# name, function, budget (s), what it needs to start: "cuda" (a usable CUDA device), "nvcc",
# "lib" (libkeepbits_cuda_c.so from the build); steps without "cuda" run their CPU part anyway
STEPS: list[tuple[str, Callable[[dict, dict, Callable[[], None]], None], float, tuple[str, ...]]] = [
    ("probe", step_probe, 60, ()),
    ("build", step_build, 180, ("nvcc",)),
    ("compile_check", step_compile_check, 60, ("nvcc",)),
    ("kernel_correctness", step_kernel_correctness, 90, ("cuda", "lib")),
    ("kernel_speed", step_kernel_speed, 90, ("cuda", "lib")),
    ("nice_first_step", step_nice_first_step, 120, ()),
    ("train_classifier", step_train_classifier, 150, ("cuda",)),
    ("train_nice", step_train_nice, 150, ("cuda",)),
    ("train_density_simplebits", step_train_density_simplebits, 90, ("cuda",)),
    ("audit_sis", step_audit_sis, 180, ()),
    ("audit_cid", step_audit_cid, 120, ()),
]


# --------------------------------------------------------------------------- orchestration
def blocked(needs: tuple[str, ...], ctx: dict) -> str | None:
    """Why a step cannot start (a ``skipped: ...`` status), or None."""
    for need in needs:
        if need == "cuda" and ctx["cuda_reason"]:
            return f"skipped: {ctx['cuda_reason']}"
        if need == "nvcc" and ctx["nvcc_reason"]:
            return f"skipped: {ctx['nvcc_reason']}"
        if need == "lib" and LIB not in ctx.get("artifacts", {}):
            return f"skipped: {LIB} was not built (see the build step)"
    return None


def run_child(name: str, ctx: dict, work: Path, out: Path, timeout: float) -> dict[str, Any]:
    """Run one step in a fresh process (own session, killed as a group at ``timeout``)."""
    entry_file, ctx_file = work / f"{name}.entry.json", work / f"{name}.context.json"
    entry_file.unlink(missing_ok=True)
    ctx_file.write_text(json.dumps({**ctx, "budget_s": timeout}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--context", str(ctx_file), "--entry", str(entry_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(out / "steps.log", "a") as log:
        log.write(f"\n==== {name} (budget {timeout:.0f} s)\n")
        log.flush()
        rc = run_group(cmd, log, timeout, env)
    entry = json.loads(entry_file.read_text()) if entry_file.is_file() else {}
    if rc is None:
        entry["status"] = f"failed: timed out after {timeout:.0f} s" + (" (results so far kept)" if entry else "")
    elif "status" not in entry:
        entry["status"] = f"failed: step process exited with code {rc}: {last_error_line(out / 'steps.log')}"
    entry["seconds"] = round(time.monotonic() - started, 1)
    return entry


def child_main(name: str, ctx_file: Path, entry_file: Path) -> int:
    """Inside a step's process: run the step, saving its entry after each part and at the end."""
    ctx = json.loads(ctx_file.read_text())
    fn = {n: f for n, f, _, _ in STEPS}[name]
    entry: dict[str, Any] = {}

    def save() -> None:
        tmp = entry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, default=float))
        os.replace(tmp, entry_file)

    try:
        fn(ctx, entry, save)
        entry.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - one step's failure is recorded; the others still run
        entry["status"] = failed(exc)
        if not isinstance(exc, CheckFailed):
            entry["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
        traceback.print_exc()
    save()
    return 0


def figure(name: str, entry: dict[str, Any]) -> str:
    """One headline figure of a step for the closing table."""
    if name == "kernel_correctness" and "vs_numpy" in entry:
        return f"max abs mask {entry['vs_numpy']['mask_max_abs']:.2g}, x̃ {entry['vs_numpy']['mixed_max_abs']:.2g}"
    if name == "kernel_speed":
        return ", ".join(f"{k}: {v['ratio_torch_over_fused']}x" for k, v in entry.items() if isinstance(v, dict) and "ratio_torch_over_fused" in v)
    if name == "nice_first_step" and "cuda_tf32" in entry:
        return f"loss rel {entry['cuda_fp32']['loss_rel_diff']:.2g}, {entry['cuda_tf32']['images_per_s']} img/s (TF32)"
    if name in ("train_classifier", "train_nice") and "images_per_s_after_epoch_1" in entry:
        return f"{entry['images_per_s_after_epoch_1']} img/s"
    if name == "train_density_simplebits" and "simplebits" in entry:
        return f"density {entry['density']['seconds']} s, simplebits {entry['simplebits']['seconds']} s (toy sizes)"
    if name == "probe":
        return str(entry.get("gpu", {}).get("name", "no GPU"))
    return ""


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.deadline_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("steps.log", "build.log"):
        (out / stale).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="keepbits_gpu_check_"))
    ctx: dict[str, Any] = {"tiny": args.tiny, "dry_run": args.dry_run, "seed": args.seed, "reps": args.reps, "out": str(out),
                           "work": str(work), "cuda_arch": args.cuda_arch, "build_dir": str(Path(args.build_dir).resolve()),
                           "cuda_reason": "dry run (--dry-run)" if args.dry_run else None,
                           "nvcc_reason": "dry run (--dry-run): nothing is built" if args.dry_run else None}
    only = set(args.only.split(",")) if args.only else {n for n, *_ in STEPS}
    if "build" not in only:  # a rerun of some steps uses what an earlier run built
        ctx["artifacts"] = {n: str(Path(ctx["build_dir"]) / n) for n in ARTIFACTS if (Path(ctx["build_dir"]) / n).is_file()}
    result: dict[str, Any] = {"mode": "dry run (CPU only)" if args.dry_run else "auto", "sizes": "tiny" if args.tiny else "full",
                              "deadline_s": args.deadline_s, "steps": {}}
    path = write_result(args.name, result, out)
    print(f"gpu_check: writing {path}; work folder {work}", flush=True)
    for name, _, budget, needs in STEPS:
        remaining = deadline - time.monotonic() - RESERVE_S
        entry: dict[str, Any]
        reason = blocked(needs, ctx) if name == "probe" or name in only else "skipped: not selected (--only)"
        if reason:
            entry = {"status": reason}
        elif remaining < MIN_STEP_S:
            entry = {"status": f"skipped: global deadline ({args.deadline_s:.0f} s) reached"}
        else:
            entry = run_child(name, ctx, work, out, min(budget, remaining))
        ctx.update(entry.pop("context", {}))
        if name == "probe" and not args.dry_run:
            probed = "torch_cuda" in ctx
            result["mode"] = "GPU" if ctx.get("torch_cuda") else "CPU only (no CUDA device)" if probed else "unknown (probe failed)"
            if not ctx.get("torch_cuda"):
                ctx["cuda_reason"] = "no CUDA device (torch.cuda.is_available() is False)" if probed else "the probe failed"
            if not ctx.get("nvcc"):
                ctx["nvcc_reason"] = "nvcc not found on PATH" if probed else "the probe failed"
        result["steps"][name] = entry
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        write_result(args.name, result, out)
        print(f"[{result['elapsed_s']:6.1f} s] {name}: {entry['status']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    width = max(len(n) for n, *_ in STEPS)
    print(f"\n{'step':<{width}}  {'seconds':>7}  status / figure")
    for name, entry in result["steps"].items():
        seconds = f"{entry['seconds']:.1f}" if "seconds" in entry else "-"
        print(f"{name:<{width}}  {seconds:>7}  {entry['status'][:90]}  {figure(name, entry)}")
    print(f"\n{path}", flush=True)
    return 1 if any(e["status"].startswith("failed") for e in result["steps"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for gpu_check.json, build.log and steps.log")
    p.add_argument("--dry-run", action="store_true", help="CPU only: skip every GPU part (and the build), run the CPU references")
    p.add_argument("--tiny", action="store_true", help="small sizes everywhere (seconds on a CPU); for tests")
    p.add_argument("--deadline-s", type=float, default=420.0, help="global wall-clock limit of all steps")
    p.add_argument("--cuda-arch", default="90", help="CUDAARCHS for the build (90: Hopper, the H200)")
    p.add_argument("--build-dir", default=str(ROOT / "native" / "build" / "gpu-check"), help="CMake build folder of the build step")
    p.add_argument("--reps", type=int, default=100, help="timed calls per kernel variant (>= 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated steps to run (the probe always runs), e.g. for a rerun of failed steps")
    p.add_argument("--name", default="gpu_check", help="JSON name: OUT/NAME.json (e.g. gpu_check_rerun)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    p.add_argument("--entry", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, Path(args.context), Path(args.entry))
    if not args.out:
        p.error("--out is required")
    if args.reps < 50 and not args.tiny:
        p.error("--reps must be >= 50 (median of at least 50 timed calls)")
    unknown = set(args.only.split(",")) - {n for n, *_ in STEPS} if args.only else set()
    if unknown:
        p.error(f"--only: unknown steps {', '.join(sorted(unknown))}; steps: {', '.join(n for n, *_ in STEPS)}")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
