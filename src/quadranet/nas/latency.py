"""Latency tables: every candidate block and fixed part of a search space, measured on a target.

A table is a JSON file holding the search space it was measured for, the setting (backend,
device, threads, batch, memory format), library versions and date, the fixed parts (stem,
downsamples, head, and the call overhead of the skeleton with no blocks) and one entry per
(stage, candidate) with its input shape. The predicted latency of an architecture is
`fixed + sum of its blocks`; a block missing from the table is an error that names it.

Blocks are timed where they run: inside a network. A reference network holds one mid-cost
candidate per stage; a block's cost is the time that `chain` copies of it (different
weights) add to that network at their stage, divided by `chain`. The difference carries
what the block really costs in a network at batch 1 (dispatch, layout conversions, caches
shared with other layers, the allocator) and leaves out the once-per-call costs (entering
inference mode, a runtime session call), which the rest of the network pays once: the
fixed part is the reference network less its blocks' entries, split into stem, downsamples,
head (each timed on the tensor the network hands it) and the remaining overhead.
Everything runs as the network does (eval mode, no autograd, the same threads and memory
format), and all entries are timed interleaved, round by round, so load from other
processes hits them alike.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quadranet.bench.runner import Stats, machine_info, synchronizer
from quadranet.models.quadranet_nas import IDENTITY, Arch, QuadraNetNAS, load_arch
from quadranet.nas.space import SearchSpace

TABLE_FORMAT = "quadranet-latency-table/1"
BACKENDS = ("torch", "onnxruntime")
MEMORY_FORMATS = ("contiguous", "channels_last")
STATISTICS = ("median", "min")


class LatencyTableError(ValueError):
    """A latency table that is malformed, incomplete or does not fit the search."""


@dataclass(frozen=True)
class Setting:
    """Where and how a table was measured."""

    backend: str = "torch"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    memory_format: str = "contiguous"
    warmup: int = 10
    repeats: int = 50
    chain: int = 3
    statistic: str = "median"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LatencyTableError(
                f"backend must be one of {list(BACKENDS)}, got {self.backend!r}"
            )
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise LatencyTableError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise LatencyTableError(
                f"memory_format must be one of {list(MEMORY_FORMATS)}, got {self.memory_format!r}"
            )
        for name in ("threads", "batch", "repeats", "chain"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LatencyTableError(f"setting.{name} must be an integer >= 1")
        if self.statistic not in STATISTICS:
            raise LatencyTableError(
                f"statistic must be one of {list(STATISTICS)}, got {self.statistic!r}"
            )
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise LatencyTableError("setting.warmup must be an integer >= 0")


@dataclass
class LatencyTable:
    """Measured milliseconds of every block and fixed part of one search space on one target."""

    space: SearchSpace
    setting: Setting
    fixed: dict[str, dict[str, Any]]
    blocks: dict[str, dict[str, dict[str, Any]]]
    env: dict[str, Any] = field(default_factory=dict)
    source: str = "table"

    def __post_init__(self) -> None:
        self.validate()

    # -- lookups -------------------------------------------------------------------------------

    @property
    def fixed_ms(self) -> float:
        """Stem + downsamples + head + skeleton overhead."""
        return float(sum(v["ms"] for v in self.fixed.values()))

    def block_ms(self, stage: int, name: str) -> float:
        """Milliseconds of one block at `stage`'s input shape; missing blocks are errors."""
        if name == IDENTITY:
            return 0.0
        key = f"stage{stage}"
        entry = self.blocks.get(key, {}).get(name)
        if entry is None:
            shape = "x".join(map(str, self.space.stage_shape(stage, self.setting.batch)))
            raise LatencyTableError(
                f"{self.source} has no latency for block {name!r} in {key} (input {shape}); "
                "profile the space that holds it (`quadranet latency profile`)"
            )
        return float(entry["ms"])

    def latency_vector(self, stage: int, choices: tuple[str, ...]) -> list[float]:
        """Milliseconds of each choice of a position of `stage`."""
        return [self.block_ms(stage, name) for name in choices]

    def predict(self, arch: Arch) -> float:
        """Predicted milliseconds of an architecture: fixed parts plus its blocks."""
        self.check_arch(arch)
        return self.fixed_ms + sum(
            self.block_ms(stage, name) for stage, names in enumerate(arch.stages) for name in names
        )

    def check_arch(self, arch: Arch) -> None:
        """Raise unless `arch` uses this table's skeleton (space, widths, stem stride)."""
        for name, mine, theirs in (
            ("space", self.space.kind, arch.space),
            ("dims", self.space.dims, arch.dims),
            ("stem_stride", self.space.stem_stride, arch.stem_stride),
        ):
            if mine != theirs:
                raise LatencyTableError(
                    f"the architecture has {name} {theirs} but {self.source} was measured for "
                    f"{mine}; use a table profiled for this space"
                )

    def check_compatible(self, **expected: Any) -> None:
        """Raise naming the first space field (kind, img_size, in_chans, ...) that differs."""
        for name, value in expected.items():
            mine = getattr(self.space, name)
            if value is not None and tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(value)):
                raise LatencyTableError(
                    f"{self.source} was measured with {name}={mine} but the search uses "
                    f"{name}={value}; profile a table for this setting (`quadranet latency "
                    "profile`) or change the search options"
                )

    # -- files ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """Every candidate of every stage and every fixed part present, times finite >= 0."""
        expected_fixed = fixed_part_names(self.space)
        missing = [n for n in expected_fixed if n not in self.fixed]
        if missing:
            raise LatencyTableError(f"{self.source}: fixed part(s) {missing} missing")
        for name, entry in self.fixed.items():
            _check_entry(entry, f"{self.source}: fixed.{name}", allow_negative=name == "overhead")
        for stage in range(len(self.space.dims)):
            key = f"stage{stage}"
            entries = self.blocks.get(key)
            if not isinstance(entries, Mapping):
                raise LatencyTableError(f"{self.source}: blocks.{key} missing")
            for name in self.space.candidates:
                if name not in entries:
                    raise LatencyTableError(
                        f"{self.source}: block {name!r} of {key} is missing; re-profile the table"
                    )
                entry = entries[name]
                _check_entry(entry, f"{self.source}: blocks.{key}.{name}")
                want = list(self.space.stage_shape(stage, self.setting.batch))
                if "input_shape" in entry and list(entry["input_shape"]) != want:
                    raise LatencyTableError(
                        f"{self.source}: blocks.{key}.{name} was measured at input "
                        f"{entry['input_shape']} but the space needs {want}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "format": TABLE_FORMAT,
            "space": self.space.to_dict(),
            "setting": vars(self.setting).copy(),
            "env": self.env,
            "fixed": self.fixed,
            "blocks": self.blocks,
        }

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "table") -> LatencyTable:
        """Parse the JSON form; every problem is a LatencyTableError naming the field."""
        if not isinstance(data, Mapping):
            raise LatencyTableError(f"{source}: a latency table must be a JSON object")
        if data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(
                f"{source}: format is {data.get('format')!r}, expected {TABLE_FORMAT!r} "
                "(write tables with `quadranet latency profile`)"
            )
        for key in ("space", "setting", "fixed", "blocks"):
            if not isinstance(data.get(key), Mapping):
                raise LatencyTableError(f"{source}: '{key}' missing or not an object")
        try:
            space = SearchSpace.from_dict(data["space"])
        except (TypeError, ValueError) as err:
            raise LatencyTableError(f"{source}: bad 'space': {err}") from None
        try:
            setting = Setting(**data["setting"])
        except TypeError as err:
            raise LatencyTableError(f"{source}: bad 'setting': {err}") from None
        return cls(
            space=space,
            setting=setting,
            fixed={k: dict(v) if isinstance(v, Mapping) else v for k, v in data["fixed"].items()},
            blocks={k: dict(v) if isinstance(v, Mapping) else v for k, v in data["blocks"].items()},
            env=dict(data.get("env") or {}),
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"latency table {path} does not exist; create one with `quadranet latency profile`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LatencyTableError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=str(path))


def _check_entry(entry: Any, where: str, allow_negative: bool = False) -> None:
    if not isinstance(entry, Mapping) or "ms" not in entry:
        raise LatencyTableError(f"{where} must be an object with 'ms'")
    ms = entry["ms"]
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms):
        raise LatencyTableError(f"{where}.ms must be a finite number, got {ms!r}")
    if ms < 0 and not allow_negative:
        raise LatencyTableError(f"{where}.ms must be >= 0, got {ms}")


def fixed_part_names(space: SearchSpace) -> list[str]:
    """The fixed parts a table holds: stem, downsample1.., head, overhead."""
    return ["stem"] + [f"downsample{i}" for i in range(1, len(space.dims))] + ["head", "overhead"]


# --- measuring ---------------------------------------------------------------------------------


def _warn_thread_env(threads: int) -> None:
    """Warn when OpenMP was started with another thread count than the one timed.

    Measured here: a table profiled with `torch.set_num_threads(1)` alone, without
    OMP_NUM_THREADS=1 in the environment, over-predicted end-to-end latency by 20-50%.
    """
    if os.environ.get("OMP_NUM_THREADS") != str(threads):
        warnings.warn(
            f"OMP_NUM_THREADS is {os.environ.get('OMP_NUM_THREADS')!r}, not {threads}: "
            f"latency tables come out inconsistent; run with OMP_NUM_THREADS={threads}",
            RuntimeWarning,
            stacklevel=3,
        )


class Runner:
    """Times modules on one backend with one setting.

    Several modules are timed interleaved (one call of each per round, `repeats` rounds after
    `warmup` calls each), so a burst of load from other processes hits every entry alike
    instead of all repeats of one entry.
    """

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.device = torch.device(setting.device)
        if setting.backend == "torch":
            torch.set_num_threads(setting.threads)
            _warn_thread_env(setting.threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LatencyTableError("device cuda was asked for but CUDA is not available")
        self.sync = synchronizer(self.device)

    @property
    def memory_format(self) -> torch.memory_format:
        if self.setting.memory_format == "channels_last":
            return torch.channels_last
        return torch.contiguous_format

    def input(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A random input in the setting's device and memory format."""
        x = torch.randn(shape, device=self.device)
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        """A callable running `module(x)` the way the setting says (eval, no autograd)."""
        module = module.eval().to(self.device)
        if x.ndim == 4:
            module = module.to(memory_format=self.memory_format)
        if self.setting.backend == "onnxruntime":
            return _ort_fn(module, x, self.setting)

        def run() -> Any:
            with torch.inference_mode():
                return module(x)

        return run

    def time_many(
        self, jobs: Mapping[str, Callable[[], Any]], progress: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        """Milliseconds per call of every job (median or min over interleaved rounds)."""
        for fn in jobs.values():
            for _ in range(self.setting.warmup):
                fn()
        self.sync()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        rounds = self.setting.repeats
        for r in range(rounds):
            for name, fn in jobs.items():
                start = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - start)
            if progress and (r + 1) % max(1, rounds // 5) == 0:
                progress(f"  timing round {r + 1}/{rounds}")
        return {
            name: getattr(Stats.of(t), self.setting.statistic) * 1e3 for name, t in times.items()
        }

    def time_ms(self, module: nn.Module, x: torch.Tensor) -> float:
        """Milliseconds of `module(x)`."""
        return self.time_many({"module": self.prepare(module, x)})["module"]


def _ort_fn(module: nn.Module, x: torch.Tensor, setting: Setting) -> Callable[[], Any]:
    """An ONNX Runtime session of `module` (exported at x's shape) as a callable."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu(), (x.cpu(),), buf, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = setting.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    cuda = setting.device.startswith("cuda")
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise LatencyTableError(f"onnxruntime has no {provider}; install onnxruntime-gpu")
    session = ort.InferenceSession(buf.getvalue(), options, providers=[provider])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def skeleton_arch(space: SearchSpace) -> Arch:
    """The space's skeleton with no blocks (stem, downsamples and head only)."""
    return Arch(space.kind, space.dims, ((),) * len(space.dims), space.stem_stride)


def build_network(arch: Arch, space: SearchSpace, layer_scale_init: float = 1e-6) -> nn.Module:
    """The network of `arch` for the space's input (eval mode)."""
    return QuadraNetNAS(
        arch,
        in_chans=space.in_chans,
        num_classes=space.num_classes,
        layer_scale_init=layer_scale_init,
    ).eval()


def environment(setting: Setting) -> dict[str, Any]:
    """Library versions, machine and date of a measurement."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": machine_info(setting.threads),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if setting.backend == "onnxruntime":
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    if setting.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(setting.device))
    return env


def profile(
    space: SearchSpace,
    setting: Setting,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure every candidate block of every stage and the fixed parts on this machine."""
    say = progress or (lambda message: None)
    runner = Runner(setting)
    inputs = probe_inputs(space, runner)
    jobs: dict[str, Callable[[], Any]] = {}
    total = len(space.dims) * len(space.candidates)
    x = inputs["stem"]
    reference = reference_stages(space)
    jobs["reference"] = runner.prepare(build_network(_arch(space, reference), space), x)
    for stage in range(len(space.dims)):
        for name in space.candidates:
            stages = list(reference)
            stages[stage] = stages[stage] + (name,) * setting.chain
            net = build_network(_arch(space, stages), space)
            jobs[f"stage{stage}/{name}"] = runner.prepare(net, x)
            say(
                f"[{len(jobs) - 1}/{total}] prepared stage{stage} {name} at "
                f"{'x'.join(map(str, space.stage_shape(stage, setting.batch)))}"
            )
    fixed_jobs, shapes = fixed_parts(space, runner, inputs)
    say(f"timing {len(jobs) + len(fixed_jobs)} entries, {setting.repeats} interleaved rounds")
    ms = runner.time_many({**jobs, **fixed_jobs}, say)
    blocks: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in range(len(space.dims)):
        shape = list(space.stage_shape(stage, setting.batch))
        blocks[f"stage{stage}"] = {
            name: {
                "ms": max((ms[f"stage{stage}/{name}"] - ms["reference"]) / setting.chain, 0.0),
                "input_shape": shape,
            }
            for name in space.candidates
        }
    fixed = {name: {"ms": ms[name], "input_shape": shapes[name]} for name in shapes}
    # Everything but the blocks, as it runs in a network that has blocks: the reference
    # network less its own blocks (a blockless network can be optimised differently, e.g.
    # ONNX Runtime cancels the layout transposes of adjacent LayerNorms).
    in_network = ms["reference"] - sum(
        blocks[f"stage{i}"][names[0]]["ms"] for i, names in enumerate(reference)
    )
    fixed["overhead"] = {
        "ms": in_network - sum(v["ms"] for v in fixed.values()),
        "reference_ms": ms["reference"],
        "blockless_ms": ms["skeleton"],
    }
    for stage, entries in blocks.items():
        say(f"{stage}: " + ", ".join(f"{k} {v['ms']:.4f}" for k, v in entries.items()) + " ms")
    say("fixed parts: " + ", ".join(f"{k} {v['ms']:.4f}" for k, v in fixed.items()) + " ms")
    return LatencyTable(space, setting, fixed, blocks, environment(setting), "profiled table")


def probe_inputs(space: SearchSpace, runner: Runner) -> dict[str, torch.Tensor]:
    """The tensors (shape, values and memory layout) the stem, downsamples and head receive.

    Layouts matter at batch 1: QuadraNet's LayerNorm2d hands on channels-last maps, and a
    part timed on a contiguous input would pay for layout conversions it never sees.
    """
    net = build_network(_arch(space, reference_stages(space)), space)
    net = net.to(runner.device, memory_format=runner.memory_format)
    seen: dict[str, torch.Tensor] = {}
    names = ["head"] + [f"stages.{i}.downsample" for i in range(1, len(space.dims))]
    modules = dict(net.named_modules())
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].clone())
        )
        for name in names
    ]
    x = (runner.setting.batch, space.in_chans, space.img_size, space.img_size)
    seen["stem"] = runner.input(x)
    try:
        with torch.inference_mode():
            net(seen["stem"])
    finally:
        for h in hooks:
            h.remove()
    return seen


def reference_stages(space: SearchSpace) -> tuple[tuple[str, ...], ...]:
    """The context blocks are timed in: one mid-cost candidate per stage."""
    return tuple((space.candidates[len(space.candidates) // 2],) for _ in space.dims)


def _arch(space: SearchSpace, stages: Sequence[Sequence[str]]) -> Arch:
    return Arch(space.kind, space.dims, tuple(map(tuple, stages)), space.stem_stride)


def fixed_parts(
    space: SearchSpace, runner: Runner, inputs: dict[str, torch.Tensor]
) -> tuple[dict[str, Callable[[], Any]], dict[str, list[int]]]:
    """Jobs timing the stem, downsamples, head and the blockless skeleton; their input shapes."""
    net = build_network(skeleton_arch(space), space).to(runner.device)
    parts = {"stem": (net.stem, inputs["stem"]), "head": (net.head, inputs["head"])}
    for i in range(1, len(space.dims)):
        parts[f"downsample{i}"] = (net.stages[i].downsample, inputs[f"stages.{i}.downsample"])
    jobs = {name: runner.prepare(module, x) for name, (module, x) in parts.items()}
    jobs["skeleton"] = runner.prepare(net, inputs["stem"])
    return jobs, {name: list(x.shape) for name, (_, x) in parts.items()}


def measure_arch(
    arch: Arch, space: SearchSpace, setting: Setting, runner: Runner | None = None
) -> float:
    """End-to-end milliseconds of `arch` for the space's input, measured in `setting`."""
    runner = runner or Runner(setting)
    net = build_network(arch, space)
    x = (setting.batch, space.in_chans, space.img_size, space.img_size)
    return runner.time_ms(net, runner.input(x))


@dataclass
class CheckResult:
    """Predicted vs measured latency of random architectures."""

    rows: list[dict[str, Any]]
    tolerance: float

    @property
    def within(self) -> int:
        """Architectures whose prediction is within the tolerance."""
        return sum(abs(r["error"]) <= self.tolerance for r in self.rows)

    def summary(self) -> str:
        errors = [abs(r["error"]) for r in self.rows]
        return (
            f"{self.within}/{len(self.rows)} architectures within +/-{100 * self.tolerance:.0f}% "
            f"(mean |error| {100 * np.mean(errors):.1f}%, max {100 * max(errors):.1f}%)"
        )


def check(
    table: LatencyTable,
    samples: int = 20,
    seed: int = 0,
    tolerance: float = 0.10,
    progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Measure random architectures end to end (interleaved) against the table's prediction."""
    say = progress or (lambda message: None)
    rng = random.Random(seed)
    runner = Runner(table.setting)
    space = table.space
    x = runner.input((table.setting.batch, space.in_chans, space.img_size, space.img_size))
    archs = [space.random_arch(rng) for _ in range(samples)]
    jobs = {str(i): runner.prepare(build_network(a, space), x) for i, a in enumerate(archs)}
    say(f"timing {samples} random architectures, {table.setting.repeats} interleaved rounds")
    measured = runner.time_many(jobs, say)
    rows = []
    for i, arch in enumerate(archs):
        predicted, ms = table.predict(arch), measured[str(i)]
        error = (predicted - ms) / ms
        rows.append(
            {
                "arch": [list(s) for s in arch.stages],
                "predicted_ms": predicted,
                "measured_ms": ms,
                "error": error,
            }
        )
        say(
            f"[{i + 1}/{samples}] predicted {predicted:.3f} ms, measured {ms:.3f} ms, "
            f"error {100 * error:+.1f}%"
        )
    return CheckResult(rows, tolerance)


def arch_latency_report(arch: Arch | str | Path, table: LatencyTable | None = None) -> str:
    """Measure a searched architecture in its table's setting; one line against its target."""
    arch = load_arch(arch)
    meta = arch.meta
    if table is not None:
        table.check_arch(arch)
        space, setting = table.space, table.setting
    elif "space" in meta and "setting" in meta:
        space, setting = SearchSpace.from_dict(meta["space"]), Setting(**meta["setting"])
    else:
        raise LatencyTableError(
            "the architecture records no search space or setting (meta.space, meta.setting); "
            "pass --table to measure it"
        )
    try:
        measured = measure_arch(arch, space, setting)
    except (LatencyTableError, ImportError, RuntimeError) as err:
        return f"latency not measured on this machine ({err}); target {meta.get('target_ms')} ms"
    line = (
        f"measured latency {measured:.3f} ms ({setting.backend}, {setting.device}, "
        f"{setting.threads} thread(s), batch {setting.batch}, {space.img_size}px)"
    )
    table_machine = (table.env if table is not None else meta).get("machine")
    here = machine_info(setting.threads)
    if table_machine and table_machine != here:
        line += f" on this machine, but the table was measured on {table_machine}"
    if "target_ms" in meta:
        verdict = "within" if measured <= meta["target_ms"] else "over"
        line += f"; target {meta['target_ms']:g} ms ({verdict})"
    if "predicted_ms" in meta:
        line += f"; table predicted {meta['predicted_ms']:.3f} ms"
    return line
