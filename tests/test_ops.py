"""The kernel boundary (`quadranet.ops`): custom ops against the float64 definition, the
backend switch, `explain`, and visibility to opcheck, compile, export, FX and FLOP counters.

The Triton backend has the same suite in `test_triton.py` (interpreted on CPU)."""

import itertools
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import quadranet
from quadranet import ops
from quadranet.blocks import QuadraBlock
from quadranet.ops import cpu, policy

CL = torch.channels_last
CPU_BUILT = cpu.load()[0] is not None


def definition(x, weight, bias, gamma, residual, padding):
    """gamma * (a * b + c) + residual by three float64 depthwise convs (the paper's formula)."""
    c, k = x.shape[1], weight.shape[-1]
    w = weight.double().view(c, 3, 1, k, k)
    b = [None] * 3 if bias is None else bias.double().view(c, 3).unbind(1)
    a, bb, cc = (F.conv2d(x.double(), w[:, i], b[i], padding=padding, groups=c) for i in range(3))
    y = a * bb + cc
    y = y if gamma is None else y * gamma.double().view(1, -1, 1, 1)
    return y if residual is None else y + residual.double()


def make_inputs(n, c, h, w, k, *, bias=True, gamma=True, residual=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(3 * c, 1, k, k, generator=gen) / k
    b = torch.randn(3 * c, generator=gen) if bias else None
    g = torch.rand(c, generator=gen) + 0.5 if gamma else None
    r = torch.randn(n, c, h, w, generator=gen) if residual else None
    return x, weight, b, g, r


def grads_of(fn, tensors, seed=1):
    """Output and gradients of sum(out * random) w.r.t. every tensor that is not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * weight.to(out.device, out.dtype)).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def assert_close(actual, expected, rtol=2e-5):
    """Agreement relative to the reference's scale (sums run in another order)."""
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not CPU_BUILT, reason="no C++ build")),
]
SHAPES = [(1, 1, 1, 1, 3), (2, 5, 9, 11, 7), (1, 40, 5, 17, 3), (3, 8, 8, 8, 5), (1, 6, 4, 3, 9)]
OPTIONS = list(itertools.product([True, False], repeat=4))  # bias, gamma, residual, keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,gamma,residual,keep", OPTIONS)
def test_op_matches_the_definition(backend, shape, bias, gamma, residual, keep):
    """Forward and all gradients (x, weight, bias, layer scale, residual) against float64."""
    *dims, k = shape
    tensors = make_inputs(*dims, k, bias=bias, gamma=gamma, residual=residual)
    tensors = [t if t is None or t.dim() < 4 else t.contiguous(memory_format=CL) for t in tensors]
    mode = "off" if backend == "reference" else "require"
    with ops.kernels(mode):

        def run(x, w, b, g, r):
            return ops.quadratic_dwconv(x, w, b, g, r, keep_branches=keep)

        y, grads = grads_of(run, tensors)
    y_ref, grads_ref = grads_of(lambda *t: definition(*t, k // 2), [
        None if t is None else t.double() for t in tensors
    ])  # fmt: skip
    assert y.dtype == torch.float32
    assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close(got, want)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_op_gradcheck_float64(keep, stride, padding, dilation):
    """float64 gradcheck of the custom op's autograd (the reference body, any geometry)."""
    x, w, b, g, r = (t.double().requires_grad_() for t in make_inputs(2, 3, 6, 7, 3))
    if stride != 1 or padding != dilation:  # the residual needs y's shape
        r = None

    def fn(x, w, b, g, r):
        return ops.quadratic_dwconv(x, w, b, g, r, stride, padding, dilation, keep)

    assert torch.autograd.gradcheck(fn, (x, w, b, g, r))
    with ops.kernels("off"):  # the plain-autograd route too
        assert torch.autograd.gradcheck(fn, (x, w, b, g, r))


def test_opcheck_on_every_backend():
    """Schema, fake tensors, autograd registration and AOT dispatch of both ops."""
    x, w, b, g, r = make_inputs(2, 16, 9, 9, 7)
    cases = [[t if t is None or t.dim() < 4 else t.contiguous(memory_format=CL) for t in
              (x, w, b, g, r)]]  # fmt: skip
    cases.append([None if t is None else t.double() for t in (x, w, b, g, r)])  # reference
    for x, w, b, g, r in cases:
        x.requires_grad_()
        for keep in (True, False):
            opcheck(
                torch.ops.quadranet.quadratic_dwconv, (x, w, b, g, r, [1, 1], [3, 3], [1, 1], keep)
            )
        grad, empty = torch.randn_like(x).contiguous(memory_format=CL), x.new_empty(0)
        args = (grad, x.detach(), w, b, g, empty, empty, [1, 1], [3, 3], [1, 1], [True] * 4)
        opcheck(torch.ops.quadranet.quadratic_dwconv_backward, args)


@pytest.mark.skipif(not CPU_BUILT, reason="no C++ build")
@pytest.mark.parametrize("batch", [1, 3])  # batch 1 also splits channels among threads
def test_cpu_kernel_is_deterministic_with_two_threads(batch):
    x, w, b, g, _ = make_inputs(batch, 24, 20, 20, 7, residual=False)
    x = x.contiguous(memory_format=CL)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [grads_of(lambda *t: ops.quadratic_dwconv(*t), [x, w, b, g]) for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)


def test_empty_batch():
    x, w, b, g, _ = make_inputs(0, 8, 5, 5, 3, residual=False)
    y, grads = grads_of(
        lambda *t: ops.quadratic_dwconv(*t), [x.contiguous(memory_format=CL), w, b, g]
    )
    assert y.shape == x.shape and torch.count_nonzero(grads[1]) == 0


def test_choose_explains_each_fallback():
    x, w, *_ = make_inputs(1, 8, 6, 6, 3)
    cl = x.contiguous(memory_format=CL)
    expected = "cpu" if CPU_BUILT else "reference"
    assert ops.choose(cl, w).backend == expected
    assert "channels-last" in ops.choose(x, w).reason
    assert "stride 1" in ops.choose(cl, w, stride=(2, 2)).reason
    assert "float32" in ops.choose(cl.double(), w.double()).reason
    with ops.kernels("off"):
        assert ops.choose(cl, w) == ("reference", "kernels off (QUADRANET_KERNELS=off)")
    with ops.kernels("require"), pytest.raises(ops.KernelError, match="channels-last"):
        ops.choose(x, w)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.kernels("sometimes").__enter__()


def test_environment_switch_is_validated_once(monkeypatch):
    monkeypatch.setattr(policy, "_ENV_MODE", None)
    monkeypatch.setenv("QUADRANET_KERNELS", "off")
    assert ops.mode() == "off"
    monkeypatch.setenv("QUADRANET_KERNELS", "auto")
    assert ops.mode() == "off"  # read once per process
    monkeypatch.setattr(policy, "_ENV_MODE", None)
    monkeypatch.setenv("QUADRANET_KERNELS", "1")
    with pytest.raises(ValueError, match="auto .* off .* require"):
        ops.mode()


def test_failed_build_is_remembered(monkeypatch, tmp_path):
    monkeypatch.setenv("QUADRANET_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    assert cpu.load() == (None, "the C++ build failed: no compiler")
    marker = cpu.cache_dir() / cpu.FAILED
    assert marker.exists()
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "_build", lambda: pytest.fail("a remembered failure is rebuilt"))
    ops_, why = cpu.load()
    assert ops_ is None and "no compiler" in why and "delete it" in why
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setenv("QUADRANET_CPU_FLAGS", "-march=native")  # another folder, built again
    monkeypatch.setattr(cpu, "_build", lambda: "built")
    assert cpu.load() == ("built", "") and "-march=native" in cpu.cflags()


def test_build_flags_follow_the_cpu_unless_set(monkeypatch):
    monkeypatch.delenv("QUADRANET_CPU_FLAGS", raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    for have, isa in (
        (set(), []),
        ({"avx2"}, []),  # FMA missing
        ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
        ({"avx2", "fma", "avx512f"}, ["-mavx2", "-mfma", "-mavx512f"]),
    ):
        monkeypatch.setattr(cpu, "_cpu_flags", lambda have=have: have | {"sse2"})
        assert cpu.cflags() == ["-O3", "-fopenmp", *isa]
    monkeypatch.setenv("QUADRANET_CPU_FLAGS", " -mavx2  -mfma ")
    assert cpu.cflags() == ["-O3", "-fopenmp", "-mavx2", "-mfma"]


@pytest.mark.skipif(
    not CPU_BUILT or "-mavx512f" not in cpu.cflags(), reason="the default build is the 8-float one"
)
def test_8_float_build_matches_the_definition_too():
    """On an AVX-512 CPU the default build uses 16-float vectors; the 8-float (AVX2) build,
    the default elsewhere, must pass the same parity tests. A process of its own: the ops of
    one build are registered per process."""
    env = dict(os.environ, QUADRANET_CPU_FLAGS="-mavx2 -mfma")
    cases = "cpu and (op_matches_the_definition or channel_mlp_matches or deterministic)"
    args = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", __file__]
    done = subprocess.run([*args, "-k", cases], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-3000:]


def small_model(**kwargs):
    torch.manual_seed(0)
    args = dict(num_classes=10, layer_scale_init=0.5, **kwargs)
    return timm.create_model("quadranet25_xxs", **args).to(memory_format=CL)


def test_explain_names_every_block():
    model = small_model()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    report = ops.explain(model, x)
    blocks = {f"stages.{i}.blocks.{j}" for i, s in enumerate(model.stages)
              for j in range(len(s.blocks))}  # fmt: skip
    assert set(report.backends()) == blocks | {f"{b}.mlp" for b in blocks}
    convs = {k: v for k, v in report.backends().items() if not k.endswith(".mlp")}
    assert set(convs.values()) == {"cpu" if CPU_BUILT else "reference"}
    with ops.kernels("off"):
        assert set(ops.explain(model, x).backends().values()) == {"reference"}
    assert "| stages.0.blocks.0 |" in str(report)
    assert "| stages.0.blocks.0.mlp |" in str(report)


def training_step(model, x, seed=3):
    torch.manual_seed(seed)  # the same drop-path draws
    y = model(x)
    y.square().sum().backward()
    model = getattr(model, "_orig_mod", model)  # a compiled model's parameters are its own
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), grads


def assert_same_step(a, b, rtol=2e-5):
    assert_close(a[0], b[0], rtol)
    for name in b[1]:
        assert_close(a[1][name], b[1][name], rtol)


@pytest.mark.parametrize("recompute", ["none", "cheap", "full"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_model_training_matches_the_reference_route(recompute, channels_last):
    """Kernels x recompute x drop-path x layer scale x memory format: one step equals the
    plain-autograd ATen route (kernels off, nothing recomputed)."""
    fmt = CL if channels_last else torch.contiguous_format
    model = small_model(recompute=recompute, drop_path_rate=0.2).to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    with ops.kernels("off"):
        for block in model.modules():
            if isinstance(block, QuadraBlock):
                block.recompute = quadranet.nn.recompute.Recompute.NONE
        expected = training_step(model, x)
        for block in model.modules():
            if isinstance(block, QuadraBlock):
                block.recompute = quadranet.nn.recompute.Recompute(recompute)
    assert_same_step(training_step(model, x), expected)


def test_recompute_keeps_less():
    from quadranet.bench.measure import saved_tensor_bytes

    x = torch.randn(2, 32, 16, 16).contiguous(memory_format=CL)
    saved = {}
    for recompute in ("none", "cheap", "full"):
        block = QuadraBlock(32, recompute=recompute).to(memory_format=CL)
        saved[recompute] = saved_tensor_bytes(lambda b=block: b(x), tuple(block.parameters()))
    assert saved["full"] < saved["cheap"] < saved["none"]


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_reparameterize_keeps_outputs_and_adds_residuals_inside_the_ops(mode):
    model = small_model(drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    folded = quadranet.reparameterize(model)
    assert folded is not model and model.stages[0].blocks[0].gamma1 is not None
    assert not [n for n, _ in folded.named_parameters() if "gamma" in n]
    with torch.no_grad(), ops.kernels(mode):
        assert_close(folded(x), model(x), 1e-5)

    def full_map_adds(net):  # additions of two whole maps at the top level (not in an op)
        adds = []

        class Adds(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if func is torch.ops.aten.add.Tensor and len(tensors) == 2:
                    adds.append(tensors[0].shape == tensors[1].shape)
                return out

        with torch.no_grad(), ops.kernels("auto"), Adds():
            net(x)
        return sum(adds)

    blocks = sum(isinstance(m, QuadraBlock) for m in model.modules())
    assert full_map_adds(model) >= 2 * blocks  # two residual adds per block
    assert full_map_adds(folded) == 0
    # still a differentiable model (the ops' residual gradient), train mode included
    folded.train()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    folded(xs[0]).square().sum().backward()
    with ops.kernels("off"):
        folded(xs[1]).square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad, 1e-4)


def test_flop_counter_sees_the_kernels():
    """FlopCounterMode with kernels on counts what the reference counts (published MACs)."""
    for name, gmacs in (("quadranet36_t", 4.13), ("hornet_t", 3.97)):
        model = timm.create_model(name).eval().to(memory_format=CL)
        x = torch.randn(1, 3, 224, 224).contiguous(memory_format=CL)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        assert round(counter.get_total_flops() / 2e9, 2) == gmacs, name
    block = QuadraBlock(16).to(memory_format=CL)
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=CL)
    with FlopCounterMode(display=False) as counter:
        block(x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    conv = 2 * 8 * 8 * 16 * 49 * 3
    assert counts["quadranet.quadratic_dwconv"] == conv
    assert counts["quadranet.quadratic_dwconv_backward"] == 2 * conv


def test_compile_fullgraph_matches_eager_with_drop_path():
    model = small_model(drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    expected = training_step(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(training_step(compiled, x), expected)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph: no recompiles
        assert_same_step(training_step(compiled, x, seed=4), training_step(model, x, seed=4))
    model.eval()
    with torch.no_grad():
        assert_close(compiled(x), model(x))


def test_compile_caches_are_keyed_by_the_operator_code(tmp_path, monkeypatch):
    """torch.compile's on-disk caches key graphs by custom-op names only: a digest of the
    ops' code in the cache tag keeps graphs compiled with other versions of it apart."""
    tag = torch.compiler.config.cache_key_tag
    marks = [t for t in tag.split(",") if t.startswith(ops.CACHE_TAG_PREFIX)]
    assert len(marks) == 1 and ops.tag_compile_caches() == tag  # added once, at import
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "the-users-tag")
    assert ops.tag_compile_caches() == f"the-users-tag,{marks[0]}"
    code = tmp_path / "op.py"
    code.write_text("y = x + 1\n")
    before = ops.code_digest([code])
    code.write_text("y = x + 2\n")
    assert ops.code_digest([code]) != before


@pytest.mark.slow
def test_inductor_compiles_a_block():
    """Inductor smoke test (fullgraph, training and inference) in a fresh process."""
    code = """
import torch
from quadranet.blocks import QuadraBlock
torch.manual_seed(0)
block = QuadraBlock(8, kernel_size=3, drop_path=0.1, layer_scale_init=0.5)
block = block.to(memory_format=torch.channels_last)
x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
compiled = torch.compile(block, fullgraph=True)
grads = []
for fn in (block, compiled):
    torch.manual_seed(1)
    fn(x).square().sum().backward()
    grads.append([p.grad.clone() for p in block.parameters()])
    block.zero_grad()
for want, got in zip(*grads):
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
block.eval()
with torch.no_grad():
    assert torch.allclose(compiled(x), block(x), rtol=1e-4, atol=1e-6)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]


def test_export_keeps_the_op_and_fx_traces_the_family():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "quadranet.quadratic_dwconv.default" in targets
    with torch.no_grad():
        assert_close(program.module()(x), model(x))
    traced = torch.fx.symbolic_trace(model)
    assert any("quadranet.quadratic_dwconv" in str(n.target) for n in traced.graph.nodes)
    with torch.no_grad():
        assert_close(traced(x), model(x))
    from torchvision.models.feature_extraction import create_feature_extractor

    features = create_feature_extractor(model, {"stages.1": "s1", "stages.3": "s3"})(x)
    assert features["s3"].shape == (2, 128, 2, 2)


FAMILY = sorted(n for n in timm.list_models() if n.startswith(("quadranet", "convnet", "hornet")))
QUADRA_STAGES = [["quadra_k3_e2"], ["quadra_k5_e4", "identity"]]
SEARCHED = [  # one architecture of each search space for quadranet_nas
    {"space": "quadra", "dims": [8, 16], "stages": QUADRA_STAGES},
    {"space": "mbconv", "dims": [8, 16], "stages": [["mbconv_k3_e3"], ["mbconv_k5_e6"]]},
]


@pytest.mark.parametrize("name", FAMILY)
def test_every_registered_model_traces_with_fx(name):
    """torch.fx traces each registered model in its training and its inference form, each
    QuadraBlock as its two custom ops (built on the meta device: tracing computes nothing)."""
    for kwargs in [{"arch": arch} for arch in SEARCHED] if name == "quadranet_nas" else [{}]:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        blocks = sum(isinstance(m, QuadraBlock) for m in model.modules())
        quadratic = name.startswith("quadranet") and kwargs.get("arch", {}).get("space") != "mbconv"
        assert (blocks > 0) == quadratic
        for form in ("training", "reparameterized"):
            if form == "reparameterized":
                quadranet.reparameterize(model.eval())
            graph = torch.fx.symbolic_trace(model).graph
            custom = [str(n.target) for n in graph.nodes if str(n.target).startswith("quadranet.")]
            assert len(custom) == 2 * blocks, (kwargs, form, custom)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch: TorchScript is deprecated
def test_torchscript_is_refused_clearly():
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.export"):
        torch.jit.script(small_model())


@pytest.mark.parametrize("recompute", ["cheap", "full"])
def test_backward_on_another_thread_takes_the_forward_route(recompute):
    """CUDA runs backward on autograd worker threads, which do not see a thread's
    `kernels(...)` override: the recomputation and the op's backward must still take the
    route the forward took."""
    import threading

    block = QuadraBlock(8, kernel_size=3, layer_scale_init=0.5, recompute=recompute)
    block = block.to(memory_format=CL)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    with ops.kernels("off"):
        y = block(x).square().sum()
    errors = []

    def backward() -> None:
        try:
            y.backward()
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert all(p.grad is not None for p in block.parameters())


def mlp_definition(x, lw, lb, w1, b1, w2, b2, gamma):
    """gamma * fc2(GELU(fc1(LN(x)))) in float64 with plain modules' functions."""
    x, lw, lb, w1, b1, w2, b2, gamma = (None if t is None else t.double()
                                        for t in (x, lw, lb, w1, b1, w2, b2, gamma))  # fmt: skip
    n = F.layer_norm(x, (x.shape[-1],), lw, lb, 1e-6)
    y = F.linear(F.gelu(F.linear(n, w1, b1)), w2, b2)
    return y if gamma is None else y * gamma


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,bias,gamma", [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("rows", [(2, 9, 7), (1, 3, 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_channel_mlp_matches_the_definition(
    monkeypatch, backend, affine, bias, gamma, rows, residual
):
    """The channel MLP op (chunked C++ kernels and ATen reference) and its gradients."""
    monkeypatch.setattr(policy, "MLP_MIN_HIDDEN", 0)  # the chunked kernels at any size
    c, hid = 12, 40
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, on=True):
        return torch.randn(*shape, generator=gen) if on else None

    tensors = [rand(*rows, c), rand(c, on=affine), rand(c, on=affine), rand(hid, c) / 3]
    tensors += [rand(hid, on=bias), rand(c, hid) / 6, rand(c, on=bias), rand(c, on=gamma)]
    mode = "off" if backend == "reference" else "auto"

    def run(x, lw, lb, w1, b1, w2, b2, g):
        with ops.kernels(mode):
            assert policy.choose_mlp(x, torch.empty(hid, x.shape[-1])).backend == backend
            return ops.channel_mlp(x, lw, lb, 1e-6, w1, b1, w2, b2, g, residual)

    def definition(x, *rest):
        y = mlp_definition(x, *rest)
        return y + x.double() if residual else y

    y, grads = grads_of(run, tensors)
    y_ref, grads_ref = grads_of(definition, tensors)
    assert_close(y, y_ref, 1e-5)
    for got, want in zip(grads, grads_ref):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close(got, want, 1e-5)
    with torch.no_grad(), ops.kernels(mode):  # inference: nothing kept
        y = ops.channel_mlp(tensors[0], *tensors[1:3], 1e-6, *tensors[3:], residual)
        assert_close(y, y_ref, 1e-5)


@pytest.mark.skipif(not CPU_BUILT, reason="no C++ build")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk", [5, 1, 4, 0])
def test_chunked_mlp_kernels_over_many_chunks(threads, chunk):
    """The C++ chunked MLP with several chunks per thread, a short last chunk and per-thread
    gradient sums added in order, given weights that require grad (as a model's do).

    Models' test shapes fit one chunk (the default chunk holds 512 KiB of hidden
    activation), so the kernels are called here with small chunks."""
    kernels = cpu.load()[0]
    c, hid, rows = 12, 40, 23
    gen = torch.Generator().manual_seed(0)
    x, lw, lb, b1, b2 = (torch.randn(n, generator=gen) for n in ((rows, c), c, c, hid, c))
    w1, w2 = torch.randn(hid, c, generator=gen) / 3, torch.randn(c, hid, generator=gen) / 6
    g = torch.randn(rows, c, generator=gen)
    tensors = [x, lw, lb, w1, b1, w2, b2]
    for weight in tensors[1:]:
        weight.requires_grad_()
    leaves = [t.detach().double().requires_grad_() for t in tensors]  # float64 reference
    y = mlp_definition(*leaves, None)
    want = torch.autograd.grad(y, leaves, g.double())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inference = kernels.mlp_inference(x, lw, lb, 1e-6, w1, b1, w2, b2, True, chunk)
        out, u, mean, rstd = kernels.mlp_forward(x, lw, lb, 1e-6, w1, b1, w2, b2, False, chunk)
        got = kernels.mlp_backward(x, mean, rstd, u, g, lw, lb, w1, w2, chunk)
    finally:
        torch.set_num_threads(previous)
    assert_close(inference, y.detach() + x.double(), 1e-5)
    assert_close(out, y.detach(), 1e-5)
    assert_close(u, F.linear(F.layer_norm(x, (c,), lw, lb, 1e-6), w1, b1), 1e-5)
    # [dx, dln_weight, dln_bias, dw1, db1, G^T GELU(u) = dw2, column sums of G = db2]
    for actual, expected in zip(got, want):
        assert_close(actual, expected, 1e-5)


def test_channel_mlp_opcheck(monkeypatch):
    monkeypatch.setattr(policy, "MLP_MIN_HIDDEN", 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 5, 16, generator=gen, requires_grad=True)
    lw, lb, b2 = (torch.randn(16, generator=gen) for _ in range(3))
    w1, b1, w2 = torch.randn(64, 16, generator=gen), torch.randn(64), torch.randn(16, 64)
    for dtype in (torch.float32, torch.float64):  # chunked kernels, reference
        args = [t.to(dtype) for t in (x, lw, lb)]
        args = [args[0].detach().requires_grad_(), *args[1:], 1e-6]
        args += [t.to(dtype) for t in (w1, b1, w2, b2)]
        gamma = torch.rand(16, dtype=dtype)
        for keep, g, residual in ((True, gamma, False), (False, None, False), (True, None, True)):
            opcheck(torch.ops.quadranet.channel_mlp, (*args, g, keep, residual))


def op_bodies():
    """`quadranet::` op -> its Python body (CustomOpDef._init_fn, private: a dispatch mode
    sees the op as one call otherwise), for modes that look inside the ops."""
    defs = (
        ops.library.quadratic_dwconv,
        ops.library.quadratic_dwconv_backward,
        ops.mlp.channel_mlp,
        ops.mlp.channel_mlp_backward,
    )
    return {d._opoverload: d._init_fn for d in defs}


class _CountOps(TorchDispatchMode):
    """Counts dispatched ops, including those inside the bodies of the `quadranet::` ops
    (each one counts itself and then runs its Python body under this mode)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bodies = op_bodies()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        body = self.bodies.get(func)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_block_dispatches_few_more_ops_than_a_convnext_block():
    """Host overhead: a QuadraBlock's forward + backward (kernels on, layer scales, drop
    path) dispatches at most 1.2x the ops of timm's ConvNeXt block at the same input."""
    from timm.models.convnext import ConvNeXtBlock

    if ops.choose(torch.zeros(1, 8, 4, 4).contiguous(memory_format=CL),
                  torch.zeros(24, 1, 7, 7), (1, 1), (3, 3), (1, 1)).backend != "cpu":  # fmt: skip
        pytest.skip("the C++ kernels are not built here")
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL)
    counts = {}
    blocks = {
        "quadra": QuadraBlock(64, drop_path=0.1, layer_scale_init=1e-6),
        "convnext": ConvNeXtBlock(64, drop_path=0.1),
    }
    for name, block in blocks.items():
        block = block.to(memory_format=CL)
        inp = x.clone().requires_grad_()
        with _CountOps() as mode:
            block(inp).sum().backward()
        counts[name] = mode.count
    assert counts["quadra"] <= 1.2 * counts["convnext"], counts


def test_channel_mlp_under_autocast_keeps_less_than_plain_autocast():
    """Under bf16 autocast the MLP op computes what autocast's plain ops do (LayerNorm in
    x's dtype, products in bf16) and keeps fewer bytes for backward."""
    gen = torch.Generator().manual_seed(0)
    c, hid = 16, 64
    x = torch.randn(2, 6, 6, c, generator=gen)
    params = [torch.randn(c, generator=gen), torch.randn(c, generator=gen)]
    params += [torch.randn(hid, c, generator=gen) / 4, torch.randn(hid, generator=gen)]
    params += [torch.randn(c, hid, generator=gen) / 8, torch.randn(c, generator=gen)]
    params += [torch.rand(c, generator=gen)]
    runs = {}
    for mode in ("auto", "off"):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with (
            ops.kernels(mode),
            torch.autocast("cpu", torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            lx, lw, lb, w1, b1, w2, b2, g = leaves
            y = ops.channel_mlp(lx, lw, lb, 1e-6, w1, b1, w2, b2, g)
        y.float().square().sum().backward()
        runs[mode] = (y.detach().float(), [t.grad for t in leaves], sum(saved.values()))
    (y_op, grads_op, bytes_op), (y_plain, grads_plain, bytes_plain) = runs["auto"], runs["off"]
    assert y_op.dtype == y_plain.dtype
    torch.testing.assert_close(y_op, y_plain, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads_op, grads_plain, strict=True):
        assert got.dtype == want.dtype == torch.float32
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * scale)
    assert bytes_op < 0.7 * bytes_plain, (bytes_op, bytes_plain)
