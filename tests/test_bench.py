"""Benchmarks: memory (Table II) and throughput (Table I) at tiny sizes, the reference model,
and the shared runner (allocators, child processes, peak memory). No timing assertions."""

import csv
import json
import subprocess
import sys

import pytest
import timm
import torch

from quadranet.bench import runner, steps, throughput
from quadranet.bench.measure import GemmShape, count_params, gemm_seconds, record_gemms
from quadranet.bench.reference import (
    ElementwiseLayerNorm2d,
    create_reference_model,
    load_quadranet_weights,
)
from quadranet.blocks import ChannelMlp
from quadranet.cli import main
from quadranet.models import QuadraNet

TINY = ["--threads", "1", "--warmup", "0", "--repeats", "1"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


MEMORY_TINY = ["bench", "memory", "--dims", "16", "--depth", "2", "--batch", "2"]
MEMORY_TINY += ["--img-size", "14", *TINY]


@pytest.mark.slow
def test_memory_bench_end_to_end(tmp_path, capsys):
    assert main(MEMORY_TINY + ["--peak-batch", "2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 16 | QuadraBlock (recompute full) |" in out and "/ HorBlock" in out
    for ext in ("md", "csv", "png"):
        assert (tmp_path / f"memory.{ext}").stat().st_size > 0
    rows = {r["row"]: r for r in read_csv(tmp_path / "memory.csv")}
    assert list(rows) == ["skip", "conv", "swin", "hor", "quadra-none", "quadra", "quadra-full"]
    for r in rows.values():
        assert float(r["saved_mib"]) > 0 and float(r["peak_mib"]) > 0 and float(r["step_s"]) > 0
        for metric in ("saved_mib", "peak_mib", "step_s"):
            assert f"{metric}_vs_conv" in r and f"{metric}_vs_hor" in r
    assert float(rows["conv"]["saved_mib_vs_conv"]) == 1.0
    assert float(rows["hor"]["peak_mib_vs_hor"]) == 1.0
    assert float(rows["quadra-full"]["saved_mib"]) < float(rows["quadra"]["saved_mib"])


def test_memory_bench_saved_bytes_of_every_row(tmp_path):
    # --peak-batch 0: saved bytes only (meta device, no child processes).
    assert main(MEMORY_TINY + ["--peak-batch", "0", "--output", str(tmp_path)]) == 0
    rows = {r["row"]: r for r in read_csv(tmp_path / "memory.csv")}
    assert list(rows) == ["skip", "conv", "swin", "hor", "quadra-none", "quadra", "quadra-full"]
    saved = {k: float(r["saved_mib"]) for k, r in rows.items()}
    assert saved["skip"] < saved["conv"] < saved["quadra-none"]
    assert saved["quadra-full"] < saved["quadra"] < saved["quadra-none"]
    assert rows["skip"]["peak_mib"] == "" and (tmp_path / "memory.png").is_file()


@pytest.mark.slow
def test_throughput_bench_end_to_end(tmp_path, capsys):
    args = ["bench", "throughput", "--models", "quadranet25_xxs,reference", "--img-size", "32"]
    args += ["--batch", "2", "--train-batch", "2", "--rounds", "1", "--gemm-size", "128"]
    assert main(args + ["--output", str(tmp_path), "--settle", "1", *TINY]) == 0
    captured = capsys.readouterr()
    assert "| reference | 23.60 |" in captured.out
    assert "up to 1 more while a call still page-faults" in captured.out
    assert "round 1/1: reference" in captured.err  # progress
    for ext in ("md", "csv", "png"):
        assert (tmp_path / f"throughput.{ext}").stat().st_size > 0
    rows = {r["model"]: r for r in read_csv(tmp_path / "throughput.csv")}
    assert list(rows) == ["quadranet25_xxs", "reference"]
    for r in rows.values():
        for key in ("infer_ips", "train_ips", "peak_train_mib", "infer_gemm_pct"):
            assert float(r[key]) > 0, key
        for key in ("infer_matmul_pct", "train_matmul_pct"):
            assert float(r[key]) > 0, key
    assert float(rows["reference"]["train_ips_vs_reference"]) == 1.0
    assert "train_ips_vs_hornet_t" not in rows["reference"]  # hornet_t was not run
    raw = json.loads((tmp_path / "throughput_rounds.json").read_text())
    assert raw["gemm"]["median"] > 0 and len(raw["rounds"]["reference"]) == 1


def test_step_bench_modes_on_cpu(tmp_path, capsys):
    """The step benchmark's code path (CUDA's default) at toy sizes on the CPU: one row per
    mode and model, ratios within a mode, a report naming the device."""
    args = ["bench", "throughput", "--modes", "eager", "--models", "quadranet25_xxs,hornet_t"]
    args += ["--img-size", "32", "--batch", "2", "--train-batch", "2", "--steps", "1"]
    args += ["--warmup", "1", "--output", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Training and inference steps on CPU (fp32)" in out
    rows = read_csv(tmp_path / "steps_fp32.csv")
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("eager", "quadranet25_xxs"),
        ("eager", "hornet_t"),
    ]
    for r in rows:
        assert float(r["train_ips"]) > 0 and float(r["infer_ips"]) > 0
    assert float(rows[1]["train_vs_hornet_t"]) == 1.0
    assert (tmp_path / "steps_fp32.png").stat().st_size > 0
    # CUDA graphs need a GPU: a clear error, no traceback
    assert main(args[:3] + ["graph"] + args[4:]) == 2
    assert "need --device cuda" in capsys.readouterr().err


def _scaled_backend(gm, example_inputs):
    """A compiler that is wrong on purpose: every output of the graph times 1.1."""
    return lambda *args: [out * 1.1 for out in gm(*args)]


def test_compiled_parity_matches_eager_and_catches_a_wrong_compiler():
    """The step benchmark's check of a compiled training step against eager: the same
    drop-path masks (errors at rounding level), and a wrong compiler is reported."""
    torch.manual_seed(0)
    model = timm.create_model("quadranet25_xxs", drop_path_rate=0.5, num_classes=10)
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    good = steps.compiled_parity(model, x, target, "fp32", backend="aot_eager")
    assert good["loss_rel_err"] < 1e-6 and good["grad_rel_err"] < 1e-5, good
    assert all(p.grad is None for p in model.parameters())  # the model itself is untouched
    bad = steps.compiled_parity(model, x, target, "fp32", backend=_scaled_backend)
    assert bad["grad_rel_err"] > 1e-2, bad
    rows = [
        dict(mode="compile", model="a", **good),
        dict(mode="compile", model="b", **bad),
        dict(mode="eager", model="c", grad_rel_err=None, loss_rel_err=None),
    ]
    failures = steps.parity_failures(rows, "fp32")
    assert len(failures) == 1 and failures[0].startswith("compile b: compiled step differs")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_bench_on_cuda(tmp_path, capsys):
    args = ["bench", "throughput", "--device", "cuda", "--models", "quadranet36_t,hornet_t"]
    args += ["--img-size", "64", "--batch", "4", "--train-batch", "4", "--steps", "2"]
    args += ["--precision", "bf16", "--modes", "eager,graph", "--output", str(tmp_path)]
    assert main(args) == 0
    assert torch.cuda.get_device_name() in capsys.readouterr().out
    rows = read_csv(tmp_path / "steps_bf16.csv")
    assert len(rows) == 4
    for r in rows:
        assert float(r["train_ips"]) > 0 and int(r["train_launches"]) > 0
        assert float(r["peak_alloc_mib"]) > 0


def test_measure_model_and_gemms_in_process():
    costs = throughput.model_costs("quadranet25_xxs", img_size=32, batch=2, train_batch=2)
    result = throughput.measure_model(
        "quadranet25_xxs",
        img_size=32,
        batch=2,
        train_batch=2,
        warmup=0,
        repeats=1,
        settle=0,
        infer_gemms=costs["infer_gemms"],
        device="cpu",
    )
    assert result["device"] == "cpu" and result["infer_ips"] > 0 and result["train_ips"] > 0
    assert result["infer_gemm_s"] > 0 and result["train_gemm_s"] == 0  # no training shapes
    rate = runner.matmul_gflops(size=64, repeats=1, device="cpu")
    assert rate["gflops"] > 0 and rate["device"] == "cpu" and "device_name" not in rate


def test_throughput_without_cuda_says_to_use_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device.*use --device cpu"):
        throughput.run_throughput_bench(models=["quadranet36_t"], device="cuda")
    assert main(["bench", "throughput", "--models", "quadranet36_t", "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "use --device cpu" in err and "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="sees 1 CUDA device"):
        runner.check_device("cuda:1")
    assert runner.check_device("cuda:0") == "cuda:0" and runner.check_device("cpu:0") == "cpu"
    with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N"):
        runner.check_device("tpu")


def test_record_gemms_finds_every_dense_product_and_skips_depthwise():
    with torch.device("meta"):
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 4, stride=4),  # im2col: (2*4*4 pixels, 3*16) @ (48, 8)
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: not a GEMM
            torch.nn.Flatten(),
            torch.nn.Linear(128, 10),
        )
        x = torch.zeros(2, 3, 16, 16)
    with torch.no_grad():
        forward = record_gemms(lambda: model(x))
    assert forward == {GemmShape(1, 32, 48, 8): 1, GemmShape(1, 2, 128, 10): 1}

    training = record_gemms(lambda: model(x.requires_grad_()).sum().backward())
    flops = sum(shape.flops * count for shape, count in training.items())
    # forward, input gradient and weight gradient of both layers: 3x the forward FLOPs
    assert flops == 3 * sum(shape.flops * count for shape, count in forward.items())
    assert GemmShape(1, 8, 32, 48) in training  # the conv's weight gradient
    assert gemm_seconds(sorted(forward.items())) > 0


def test_record_gemms_sees_the_products_inside_the_channel_mlp_operator():
    with torch.device("meta"):
        mlp = ChannelMlp(16)
        x = torch.zeros(2, 5, 5, 16)
    plain_forward = record_gemms(lambda: mlp.plain_forward(x))
    with torch.no_grad():
        assert record_gemms(lambda: mlp(x)) == plain_forward
    plain_training = record_gemms(lambda: mlp.plain_forward(x.requires_grad_()).sum().backward())
    training = record_gemms(lambda: mlp(x.requires_grad_()).sum().backward())

    def flops(shapes):
        return sum(shape.flops * count for shape, count in shapes.items())

    assert flops(training) == flops(plain_training) == 3 * flops(plain_forward)


def test_throughput_rejects_unknown_models(capsys):
    assert main(["bench", "throughput", "--models", "quadranet36_tt"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_reference_has_the_parameter_count_of_quadranet36_t():
    with torch.device("meta"):
        reference = create_reference_model()
        quadranet = timm.create_model("quadranet36_t")
    assert count_params(reference) == count_params(quadranet) == 23_598_824
    assert isinstance(reference.stem[1], ElementwiseLayerNorm2d)
    assert isinstance(reference.stages[2].downsample[0], ElementwiseLayerNorm2d)
    assert not timm.is_model("reference")


def test_reference_computes_quadranet_with_the_same_weights():
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=10)
    quadranet = QuadraNet(**kwargs).double()
    with torch.no_grad():
        for p in quadranet.parameters():  # away from the init, so every branch matters
            p.normal_(0, 0.3)
    reference = create_reference_model(**kwargs).double()
    load_quadranet_weights(reference, quadranet)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(reference(x), quadranet(x), rtol=1e-10, atol=1e-10)
    # inference too, where QuadraNet runs its kernels
    reference, quadranet = (
        m.float().eval().to(memory_format=torch.channels_last) for m in (reference, quadranet)
    )
    x = x.float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), quadranet(x), rtol=1e-4, atol=1e-4)


def test_allocator_env():
    base = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    env = runner.allocator_env("retained", threads=3, base=base)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{runner.RETAINED_TUNABLES}"
    assert env["OMP_NUM_THREADS"] == "3" and "LD_PRELOAD" not in env
    assert "mmap_max=0" in runner.RETAINED_TUNABLES and "trim_threshold=107374182400" in (
        runner.RETAINED_TUNABLES
    )
    mmap = runner.allocator_env("mmap", base={})
    assert mmap["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=131072"
    plain = runner.allocator_env("default", base={"PATH": "/bin"})
    assert "GLIBC_TUNABLES" not in plain and "LD_PRELOAD" not in plain
    assert plain["PYTHONPATH"]  # the child finds this package
    with pytest.raises(ValueError, match="unknown allocator"):
        runner.allocator_env("tcmalloc")


def test_jemalloc_is_preloaded(tmp_path, monkeypatch):
    lib = tmp_path / "x86_64-linux-gnu" / "libjemalloc.so.2"
    lib.parent.mkdir()
    lib.touch()
    monkeypatch.setattr(runner, "JEMALLOC_PATTERNS", (str(tmp_path / "*" / "libjemalloc.so.2"),))
    env = runner.allocator_env("jemalloc", base={"LD_PRELOAD": "/other.so"})
    assert env["LD_PRELOAD"] == f"{lib}:/other.so"


def test_missing_jemalloc_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "JEMALLOC_PATTERNS", (str(tmp_path / "*" / "libjemalloc.so.2"),))
    with pytest.raises(FileNotFoundError, match="apt-get install libjemalloc2"):
        runner.allocator_env("jemalloc")
    args = ["bench", "memory", "--dims", "8", "--depth", "1", "--allocator", "jemalloc"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "apt-get install libjemalloc2" in err and "Traceback" not in err


def test_child_processes():
    with runner.ChildProcesses("default", threads=1) as children:
        assert children.run("quadranet.bench.runner:ratio", dict(value=3, reference=2)) == 1.5
        # A user error in a job comes back with its message; the next job still runs.
        with pytest.raises(ValueError, match="unknown block row"):
            children.run("quadranet.bench.memory:build_stack", dict(row="x", dim=8, depth=1))
        with pytest.raises(RuntimeError, match="TypeError"):
            children.run("quadranet.bench.runner:ratio", dict(nope=1))
        pids = [children.run("os:getpid", {}) for _ in range(2)]
    assert len(set(pids)) == 2  # every job in a new process


PEAK_SCRIPT = """
import torch
from quadranet.bench import runner, steps, throughput
with runner.track_peak_memory("cpu") as peak:
    x = torch.ones(16 * 2**20)  # 64 MiB, touched, then freed
    del x
print(peak.bytes)
"""


def test_peak_memory_sees_a_freed_allocation():
    # a fresh process: this one's heap may already hold freed pages that hide the growth
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 60 * 2**20


def test_time_fn_and_tables():
    calls = []
    stats = runner.time_fn(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(stats.values) == 3
    assert stats.min <= stats.median <= stats.max
    cols = [runner.Column("name", "name"), runner.Column("x", "x", "{:.1f}")]
    table = runner.markdown_table([dict(name="a", x=1.0), dict(name="b", x=None)], cols)
    assert table.splitlines() == ["| name | x |", "|---|---:|", "| a | 1.0 |", "| b | – |"]
    assert runner.ratio(2.0, 4.0) == 0.5 and runner.ratio(1.0, None) is None


@pytest.mark.parametrize(
    "faults, expected_calls",
    [
        ([900_000, 200_000, 30_000, 5, 0, 0, 0], 4),  # growing pool: warm up until it settles
        ([50_000] * 9, 2),  # the same faults every call (plain glibc): no extra calls
        ([900_000, 200_000, 100_000, 60_000, 30_000, 20_000, 9_000, 5_000], 6),  # capped
    ],
)
def test_time_fn_settles_the_allocator(monkeypatch, faults, expected_calls):
    counter = iter(range(10**9))
    per_call = iter(faults + [0] * 20)
    total = [0]

    def fake_faults():
        return total[0]

    calls = []

    def fn():
        calls.append(next(counter))
        total[0] += next(per_call)

    monkeypatch.setattr(runner, "minor_page_faults", fake_faults)
    runner.time_fn(fn, warmup=2, repeats=3, settle=4)
    assert len(calls) == expected_calls + 3
    calls.clear()
    runner.time_fn(fn, warmup=0, repeats=1, settle=4)  # no warm-up: nothing to settle after
    assert len(calls) == 1
