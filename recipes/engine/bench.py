"""Benchmarks: time and peak memory of each attention path, and whole-model training throughput.

Every measured case runs in a fresh subprocess on CPU, so its peak memory can be read as the
rise of the process's peak resident set size (VmHWM, reset before the block; ``ru_maxrss`` where it
cannot be reset) over its resident size after the setup (imports,
inputs, data, model) to after the timed runs; on CUDA the allocator's peak is used instead.
Times are medians of repeated runs after warm-up runs. Other processes share the CPUs, so only
ratios within one run are meaningful; the tables therefore show ratios to a baseline path
(SDPA without position encoding for attention, ``abs`` for training).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import UserError

ATTENTION_PATHS = ("sdpa", "reference", "blockwise", "fused", "triton", "flash")  # flash: CUDA
# Bytes the reference keeps per (B, H, T, T) element over forward + backward (float32 scores,
# gates, positions, weights, two int64 index tensors, two gathered logits, their gradients):
# calibrated from its measured peak at T=1024 (about 150 MiB for B=1, H=4), rounded up.
REFERENCE_BYTES_PER_PAIR = 40
REFERENCE_LIMIT_GIB = 4.0  # skip the reference above this estimated peak


@dataclass
class AttentionSetting:
    """Shape and options shared by every attention case of a run."""

    batch: int = 1
    heads: int = 4
    dim: int = 64
    npos: int = 64
    causal: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None


@dataclass
class CaseResult:
    """One measured (or skipped) case: a path at a length, or an encoding in a recipe."""

    name: str
    length: int | None
    time_ms: float | None = None
    peak_mib: float | None = None
    examples_per_s: float | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def reference_estimate_gib(setting: AttentionSetting, length: int) -> float:
    """Estimated peak memory of the reference at this length, in GiB."""
    pairs = setting.batch * setting.heads * length * length
    return pairs * REFERENCE_BYTES_PER_PAIR / 2**30


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (Linux), or None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a later peak belongs to the measured block.

    Without it, a transient peak during setup (imports, the warm-up call) can hide the block's
    own peak entirely: ru_maxrss never decreases.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _PeakMemory:
    """Peak memory rise over a block: CUDA allocator peak, or the rise of peak RSS on CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.rise = 0

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss():
            self.base = (_status_kib("VmRSS") or 0) * 1024
            self.use_hwm = True
        else:
            self.base = _peak_rss_bytes()
            self.use_hwm = False
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.rise = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.use_hwm:
            self.rise = max(0, (_status_kib("VmHWM") or 0) * 1024 - self.base)
        else:
            self.rise = _peak_rss_bytes() - self.base


def _timed(step: Any, repeats: int, warmup: int, device: Any) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each timed call of ``step`` after ``warmup`` untimed ones.

    CPU time (all threads of this process) is what other jobs on a shared machine disturb least:
    wall time also counts the waits for a CPU.
    """
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def attention_step(path: str, setting: AttentionSetting, length: int) -> Any:
    """A closure running forward + backward of one attention path on fresh random inputs."""
    import torch
    import torch.nn.functional as F

    from encoders.cope import cope_attention, table_size

    device = torch.device(setting.device)
    dtype = getattr(torch, setting.dtype)
    generator = torch.Generator().manual_seed(0)
    shape = (setting.batch, setting.heads, length, setting.dim)
    q, k, v = (
        torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)
    )
    rows = table_size(setting.npos, setting.causal)
    table = (torch.randn(rows, setting.dim, generator=generator) * 0.02).to(device, dtype)
    table.requires_grad_()
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)

    def step() -> None:
        for tensor in (q, k, v, table):
            tensor.grad = None
        if path == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=setting.causal)
        elif path == "flash":  # FlashAttention itself: fails rather than fall back
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=setting.causal)
        else:
            out = cope_attention(q, k, v, table, causal=setting.causal, impl=path)  # type: ignore[arg-type]
        out.backward(grad_out)

    return step


def run_attention_case(path: str, setting: AttentionSetting, length: int) -> CaseResult:
    """Measure one path at one length in this process."""
    import torch

    if setting.threads:
        torch.set_num_threads(setting.threads)
    device = torch.device(setting.device)
    # One tiny call first: library initialisation (thread pools, lazy imports) is not the
    # path's memory, and would otherwise dominate short sequences.
    attention_step(path, setting, min(length, 16))()
    step = attention_step(path, setting, length)
    with _PeakMemory(device) as memory:
        times, cpu_times = _timed(step, setting.repeats, setting.warmup, device)
    return CaseResult(
        path,
        length,
        time_ms=statistics.median(times) * 1e3,
        peak_mib=memory.rise / 2**20,
        extra={"times_ms": [t * 1e3 for t in times], "cpu_ms": statistics.median(cpu_times) * 1e3},
    )


def _skip_reason(path: str, setting: AttentionSetting, length: int) -> str | None:
    """Why a case is not run, or None."""
    if path == "reference":
        estimate = reference_estimate_gib(setting, length)
        if estimate > REFERENCE_LIMIT_GIB:
            return f"skipped (est. {estimate:.1f} GiB)"
    if path == "flash" and (setting.device == "cpu" or setting.dtype == "float32"):
        return "skipped (needs CUDA and bfloat16/float16)"
    if path == "fused":
        from encoders.cope_cpu import kernel_available

        if setting.device != "cpu":
            return "skipped (CPU kernel)"
        if not kernel_available():
            return "skipped (kernel not built)"
    if path == "triton":
        from encoders.cope_triton import triton_available

        if not triton_available():
            return "skipped (triton not installed)"
        if setting.device == "cpu":
            return "skipped (needs CUDA)"
    return None


def _in_subprocess(kind: str, payload: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its JSON result."""
    command = [sys.executable, "-m", "recipes.engine.bench", kind, json.dumps(payload)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"skipped (over {timeout:.0f} s)"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        if done.returncode < 0 or "MemoryError" in reason or "out of memory" in reason:
            return {"skipped": f"failed (out of memory: {reason})"}
        return {"skipped": f"failed ({reason})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_attention(
    lengths: list[int],
    paths: list[str] | None = None,
    setting: AttentionSetting | None = None,
    *,
    isolate: bool | None = None,
    timeout: float | None = 600,
    on_case: Any = None,
) -> list[CaseResult]:
    """Time and peak memory of each path at each length (fresh subprocess per case on CPU)."""
    setting = setting or AttentionSetting()
    paths = list(paths or ATTENTION_PATHS)
    unknown = [path for path in paths if path not in ATTENTION_PATHS]
    if unknown:
        raise UserError(
            f"unknown attention path {unknown[0]!r}; choose from: {', '.join(ATTENTION_PATHS)}"
        )
    if any(length < 1 for length in lengths):
        raise UserError("sequence lengths must be positive")
    if setting.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available")
    isolate = setting.device == "cpu" if isolate is None else isolate
    results = []
    for length in lengths:
        for path in paths:
            reason = _skip_reason(path, setting, length)
            if reason:
                result = CaseResult(path, length, skipped=reason)
            elif isolate:
                payload = {"path": path, "length": length, "setting": asdict(setting)}
                data = _in_subprocess("attention-case", payload, timeout)
                result = CaseResult(**{"name": path, "length": length, **data})
            else:
                result = run_attention_case(path, setting, length)
            results.append(result)
            if on_case:
                on_case(result)
    return results


def calibration_table(document: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The dispatcher's calibration table (see ``encoders.cope.CALIBRATION``) from a benchmark.

    Each CoPE path's time is divided by B * H (ms per (batch, head) slice). The run's lengths
    are merged into its direction's entry of ``previous``: a measured (path, length) replaces
    the old value, the rest is kept (so long lengths can be added by a run without the
    reference); the other direction is kept as it was.
    """
    setting = document["setting"]
    slices = setting["batch"] * setting["heads"]
    direction = "causal" if setting["causal"] else "bidirectional"
    old = previous.get(direction, {"lengths": [], "ms_per_head": {}, "runs": []})
    values = {
        (path, length): ms
        for path, column in old["ms_per_head"].items()
        for length, ms in zip(old["lengths"], column, strict=True)
    }
    for case in document["cases"]:
        if case["name"] != "sdpa" and case["time_ms"] is not None:
            values[(case["name"], case["length"])] = case["time_ms"] / slices
    lengths = sorted({length for _, length in values} | set(old["lengths"]))
    paths = [p for p in ATTENTION_PATHS if any(name == p for name, _ in values)]
    run = {key: document.get(key) for key in ("command", "commit")}
    entry = {
        "runs": [*old.get("runs", []), {**run, "setting": setting}],
        "lengths": lengths,
        "ms_per_head": {path: [values.get((path, t)) for t in lengths] for path in paths},
    }
    meta = {key: document[key] for key in ("command", "commit", "environment") if key in document}
    return {**previous, **meta, direction: entry}


# --------------------------------------------------------------------------- training


@dataclass
class TrainSetting:
    """What every encoding's training benchmark shares."""

    recipe: str
    preset: str | None = None
    steps: int = 10
    warmup: int = 2
    batch_size: int | None = None
    device: str = "cpu"
    threads: int | None = None
    set_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None  # folder recipes (speech-commands) read their tree here
    workers: int | None = None  # None: batches prepared beforehand; N: fed as in training


def run_train_case(pe: str, setting: TrainSetting) -> CaseResult:
    """Train ``setting.steps`` steps of one encoding in this process; examples/s and peak."""
    import torch

    from recipes.base import get_recipe, pad_collate
    from recipes.engine.config import resolve_config
    from recipes.engine.evaluate import forward_batch, loss_and_counts, move_batch
    from recipes.engine.trainer import make_optimizer, seed_everything

    if setting.threads:
        torch.set_num_threads(setting.threads)
    recipe = get_recipe(setting.recipe)
    options = {"model.pe": pe}
    if setting.batch_size:
        options["train.batch_size"] = setting.batch_size
    config = resolve_config(
        recipe, preset=setting.preset, cli_options=options, set_options=setting.set_options
    )
    batch_size = int(config["train.batch_size"])
    needed = (setting.steps + setting.warmup) * batch_size
    if "data.train_size" in config and config["data.train_size"] > needed:
        config["data.train_size"] = needed  # generated recipes: build only what is trained on
    device = torch.device(setting.device)
    seed_everything(0)
    bundle = recipe.build_data(config, Path(setting.data_dir) if setting.data_dir else None, False)
    if setting.workers is not None:
        return _fed_train_case(pe, setting, recipe, config, bundle, device)
    collate = bundle.collate or pad_collate
    size = len(bundle.train)  # type: ignore[arg-type]
    batches = [
        move_batch(
            collate([bundle.train[(start + i) % size] for i in range(batch_size)]),
            device,
        )
        for start in range(0, needed, batch_size)
    ]
    model = recipe.build_model(config, bundle.info).to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    order = iter(batches)
    # One single-example forward/backward first: library initialisation is not the model's.
    first = move_batch(collate([bundle.train[0]]), device)
    loss_and_counts(forward_batch(model, first), first["targets"])[0].backward()
    model.zero_grad(set_to_none=True)

    def step() -> None:
        batch = next(order)
        logits = forward_batch(model, batch)
        loss, _, _ = loss_and_counts(logits, batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with _PeakMemory(device) as memory:
        times, cpu_times = _timed(step, setting.steps, setting.warmup, device)
    tokens = sum(int(batch["inputs"].shape[1]) for batch in batches) / len(batches)
    return CaseResult(
        pe,
        None,
        time_ms=statistics.median(times) * 1e3,
        peak_mib=memory.rise / 2**20,
        examples_per_s=batch_size / statistics.median(times),  # robust to other load
        extra={
            "batch_size": batch_size,
            "mean_tokens": tokens,
            "parameters": sum(p.numel() for p in model.parameters()),
            "npos": config.get("model.npos"),
            "cpu_ms": statistics.median(cpu_times) * 1e3,
        },
    )


def _fed_train_case(
    pe: str, setting: TrainSetting, recipe: Any, config: dict, bundle: Any, device: Any
) -> CaseResult:
    """Training steps fed by the engine's BatchFeeder (see :mod:`recipes.engine.feed_bench`)."""
    from recipes.base import pad_collate
    from recipes.engine.feed_bench import measure_fed_training
    from recipes.engine.feeding import BatchFeeder
    from recipes.engine.sampler import ResumableBatchSampler
    from recipes.engine.trainer import make_optimizer

    batch_size = int(config["train.batch_size"])
    sampler = ResumableBatchSampler(len(bundle.train), batch_size, 0)
    feeder = BatchFeeder(
        bundle.train, bundle.collate or pad_collate, sampler, device, workers=setting.workers or 0
    )
    model = recipe.build_model(config, bundle.info).to(device)
    optimizer = make_optimizer(model, config)
    with _PeakMemory(device) as memory:
        fed = measure_fed_training(
            model, optimizer, feeder, steps=setting.steps, warmup=setting.warmup,
            precision=config["train.precision"],
        )  # fmt: skip
    return CaseResult(
        pe,
        None,
        time_ms=fed["step_ms"],
        peak_mib=memory.rise / 2**20,
        examples_per_s=batch_size / (fed["step_ms"] / 1e3),
        extra={"batch_size": batch_size, "precision": config["train.precision"], **fed},
    )


def bench_train(
    pes: list[str],
    setting: TrainSetting,
    *,
    isolate: bool | None = None,
    timeout: float | None = 900,
    on_case: Any = None,
) -> list[CaseResult]:
    """Training throughput and peak memory of each encoding on one recipe."""
    from recipes.base import get_recipe
    from recipes.engine.config import validate_position_encoding

    get_recipe(setting.recipe)  # an unknown recipe fails here, with the list of known ones
    for pe in pes:
        validate_position_encoding(pe)
    isolate = setting.device == "cpu" if isolate is None else isolate
    results = []
    for pe in pes:
        if isolate:
            data = _in_subprocess("train-case", {"pe": pe, "setting": asdict(setting)}, timeout)
            result = CaseResult(**{"name": pe, "length": None, **data})
        else:
            result = run_train_case(pe, setting)
        results.append(result)
        if on_case:
            on_case(result)
    return results


def ratios(results: list[CaseResult], baseline: str) -> dict[tuple[str, int | None], dict]:
    """Time, memory and throughput of each case relative to ``baseline`` at the same length."""
    base = {r.length: r for r in results if r.name == baseline and not r.skipped}
    out: dict[tuple[str, int | None], dict] = {}
    for result in results:
        ref = base.get(result.length)
        if result.skipped or ref is None:
            continue

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if a is None or not b or b <= 0 else a / b

        out[(result.name, result.length)] = {
            "time": ratio(result.time_ms, ref.time_ms),
            "memory": ratio(result.peak_mib, ref.peak_mib),
            "throughput": ratio(result.examples_per_s, ref.examples_per_s),
            "cpu_time": ratio(result.extra.get("cpu_ms"), ref.extra.get("cpu_ms")),
        }
    return out


def results_json(results: list[CaseResult], baseline: str, meta: dict[str, Any]) -> dict:
    """The JSON document of a benchmark: settings, cases and ratios to the baseline."""
    relative = ratios(results, baseline)
    cases = []
    for result in results:
        entry = asdict(result)
        entry["ratios_to_" + baseline] = relative.get((result.name, result.length))
        cases.append(entry)
    return {**meta, "baseline": baseline, "cases": cases}


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def environment() -> dict[str, Any]:
    """Versions and machine facts that the numbers depend on."""
    import platform

    import torch

    return {
        "machine": _cpu_model() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _main(argv: list[str]) -> None:
    """Subprocess entry point: ``python -m recipes.engine.bench KIND JSON`` prints one result."""
    kind, payload = argv[0], json.loads(argv[1])
    if kind == "attention-case":
        setting = AttentionSetting(**payload["setting"])
        result = run_attention_case(payload["path"], setting, payload["length"])
    elif kind == "train-case":
        setting_t = TrainSetting(**payload["setting"])
        result = run_train_case(payload["pe"], setting_t)
    else:
        raise SystemExit(f"unknown case kind {kind!r}")
    data = asdict(result)
    data.pop("name")
    data.pop("length")
    data = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in data.items()}
    print(json.dumps(data))


if __name__ == "__main__":
    _main(sys.argv[1:])
