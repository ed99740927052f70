"""Quadratic adaptation: exact conversion, adapter mode, checkpoints, `quadranet adapt`."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from quadranet.adapt import (
    load_adapted,
    plain_state_dict,
    quadranet_name,
    quadratic_parameters,
    quadratize,
)
from quadranet.cli import main as cli_main
from quadranet.engine import TrainConfig, train
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.train import build_optimizer
from quadranet.models import create_model
from quadranet.nn import QuadraticConv2d, QuadraticLinear

# Three stages at 16, 8 and 4 px for a 32 px input; layer scale 1 so every branch counts.
TINY = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32], layer_scale_init=1.0)
FAKE = {"num_classes": 4, "img_size": 16, "in_chans": 1, "length": 32, "val_length": 16}
QUIET_RECIPE = ["--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--randaugment", "none"]
QUIET_RECIPE += ["--reprob", "0", "--hflip", "0", "--drop-path", "0", "--quiet"]


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every weight so the model stands for a trained one (not its tiny init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def convnet(**kwargs) -> nn.Module:
    return trained_like(create_model("convnet36_xxs", num_classes=5, **{**TINY, **kwargs}))


def convnext() -> nn.Module:
    return trained_like(timm.create_model("convnext_atto", pretrained=False, num_classes=5))


def first_order_layers(model: nn.Module, channel: bool) -> dict[str, nn.Module]:
    """Name -> the depthwise convs (and fc1 layers) quadratize replaces."""
    names = ("mixer", "conv_dw") + (("mlp.fc1",) if channel else ())
    return {
        n: m
        for n, m in model.named_modules()
        if n.endswith(names) and isinstance(m, nn.Conv2d | nn.Linear)
    }


def split_fused(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """(A, B, C) of a fused per-group [A; B; C] tensor, each shaped like a first-order one."""
    return tuple(b.flatten(0, 1) for b in t.reshape(groups, 3, -1, *t.shape[1:]).unbind(1))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, size: int, steps: int = 1) -> None:
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, size, size, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# --- exact conversion --------------------------------------------------------------------------


@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize("family", ["convnet", "convnext_atto"])
def test_converted_model_computes_the_same_function(family, channel):
    model, size = (convnet(), 32) if family == "convnet" else (convnext(), 64)
    x = torch.randn(2, 3, size, size)
    quad = quadratize(model, channel=channel)
    replaced = first_order_layers(model, channel)
    assert replaced and all(
        isinstance(dict(quad.named_modules())[n], QuadraticConv2d | QuadraticLinear)
        for n in replaced
    )
    assert not any(isinstance(m, QuadraticConv2d) for m in model.modules())  # a copy
    with torch.no_grad():
        torch.testing.assert_close(quad(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(quad.forward_features(x), model.forward_features(x))
    # The training path (custom autograd op of the quadratic conv) computes the same.
    torch.testing.assert_close(quad.train()(x), model.train()(x), rtol=1e-4, atol=1e-5)


def test_conversion_sets_c_to_trained_weights_a_to_zero_b_random():
    model = convnet()
    quad = quadratize(model, channel=True, b_std=0.05)
    modules = dict(quad.named_modules())
    for name, old in first_order_layers(model, channel=True).items():
        new = modules[name]
        groups = getattr(new, "groups", 1)
        a, b, c = split_fused(new.weight, groups)
        assert torch.equal(c.reshape(old.weight.shape), old.weight)
        assert torch.equal(a, torch.zeros_like(a))
        assert 0.02 < b.std() < 0.08
        ba, bb, bc = split_fused(new.bias, groups)
        assert torch.equal(bc, old.bias) and not ba.any() and not bb.any()
    conv = modules["stages.0.blocks.0.mixer"]
    assert conv.padding == (3, 3) and conv.stride == (1, 1) and conv.groups == 8


def test_timm_api_of_a_converted_convnext_keeps_working():
    model = convnext()
    quad = quadratize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = quad.forward_features(x)
        torch.testing.assert_close(quad.forward_head(features), model(x))
        assert quad.forward_head(features, pre_logits=True).shape == (2, 320)
        quad.reset_classifier(3)
        assert quad(x).shape == (2, 3) and quad.get_classifier().out_features == 3
    assert quad.feature_info == model.feature_info


# --- training ----------------------------------------------------------------------------------


def test_one_optimizer_step_moves_the_quadratic_parameters():
    quad = quadratize(convnet())
    before = {k: v.detach().clone() for k, v in quad.state_dict().items()}
    step(quad, torch.optim.AdamW(quad.parameters(), lr=1e-3), 32)
    params = quadratic_parameters(quad)
    assert "stages.0.blocks.0.mixer.weight" in params
    for name in params:
        assert not torch.equal(params[name], before[name]), name
    a, _, _ = split_fused(quad.stages[0].blocks[0].mixer.weight, 8)
    assert a.abs().max() > 0  # A left zero: the quadratic term started learning


@pytest.mark.parametrize("family", ["convnet", "convnext_atto"])
def test_adapter_mode_leaves_every_trained_weight_bitwise_untouched(family):
    model, size = (convnet(), 32) if family == "convnet" else (convnext(), 64)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    layers = first_order_layers(model, channel=True)
    quad = quadratize(model, channel=True, adapter_only=True)
    trainable = {n for n, p in quad.named_parameters() if p.requires_grad}
    assert trainable == set(quadratic_parameters(quad))
    assert all(".parametrizations." in n for n in trainable)
    # The engine's AdamW with weight decay, then SGD with momentum and coupled decay.
    cfg = TrainConfig(opt="adamw", weight_decay=0.05)
    step(quad, build_optimizer(cfg, quad, lr=1e-2), size, steps=2)
    step(quad, torch.optim.SGD(quad.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1), size)
    state = plain_state_dict(quad)
    assert set(state) == set(old)
    for key, value in old.items():
        layer = key.rsplit(".", 1)[0]
        if layer in layers:
            groups = getattr(layers[layer], "groups", 1)
            a, _, c = split_fused(state[key], groups)
            assert torch.equal(c.reshape(value.shape), value), key
            assert key.endswith("bias") or a.abs().max() > 0, key
        else:
            assert torch.equal(state[key], value), key


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_only", [False, True])
def test_saved_checkpoint_loads_into_a_freshly_built_quadranet(tmp_path, adapter_only):
    quad = quadratize(convnet(), adapter_only=adapter_only)
    step(quad, torch.optim.AdamW([p for p in quad.parameters() if p.requires_grad], 1e-2), 32)
    path = ckpt.save_weights(tmp_path / "q.safetensors", plain_state_dict(quad))
    weights, _ = ckpt.load_weights(path)
    fresh = create_model(quadranet_name("convnet36_xxs"), num_classes=5, **TINY).eval()
    fresh.load_state_dict(weights)  # strict: the key mapping is exact
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), quad(x))


def test_convnext_state_dict_loads_into_a_quadratized_fresh_convnext():
    quad = quadratize(convnext(), channel=True, adapter_only=True)
    step(quad, torch.optim.AdamW([p for p in quad.parameters() if p.requires_grad], 1e-2), 64)
    fresh = quadratize(timm.create_model("convnext_atto", num_classes=5), channel=True).eval()
    fresh.load_state_dict(plain_state_dict(quad))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), quad(x))


# --- errors ------------------------------------------------------------------------------------


def test_models_without_first_order_blocks_are_refused():
    with pytest.raises(ValueError, match="already quadratic"):
        quadratize(create_model("quadranet36_xxs", **TINY))
    spatial = quadratize(convnet())
    with pytest.raises(ValueError, match="already quadratic"):
        quadratize(spatial)
    both = quadratize(spatial, channel=True)  # a later call converts what is left
    assert isinstance(both.stages[0].blocks[0].mlp.fc1, QuadraticLinear)
    with pytest.raises(ValueError, match="no block to convert.*convnext"):
        quadratize(nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)))
    with pytest.raises(ValueError, match="b_std must be > 0"):
        quadratize(convnet(), b_std=0.0)
    with pytest.raises(ValueError, match="not one of our first-order twins"):
        quadranet_name("resnet18")


# --- `quadranet adapt` -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_order_run(tmp_path_factory):
    """A tiny convnet36_xxs trained by the engine for a few batches on fake data."""
    out = tmp_path_factory.mktemp("first") / "run"
    cfg = TrainConfig(
        model="convnet36_xxs",
        model_kwargs=TINY,
        dataset="fake",
        dataset_kwargs=FAKE,
        batch_size=8,
        epochs=1,
        lr=1e-2,
        warmup_epochs=0,
        mixup=0.0,
        cutmix=0.0,
        randaugment=None,
        reprob=0.0,
        hflip=0.0,
        drop_path=0.0,
        workers=0,
        quiet=True,
        output=str(out),
    )
    train(cfg)
    return out


def adapt(first_order_run, out, *flags: str) -> int:
    argv = ["adapt", "--checkpoint", str(first_order_run), "--epochs", "1"]
    argv += ["--warmup-epochs", "0", "--lr", "1e-2", "--output", str(out), *QUIET_RECIPE]
    return cli_main(argv + list(flags))


def test_cli_adapter_only_writes_a_quadranet_checkpoint(first_order_run, tmp_path, capsys):
    out = tmp_path / "adapted"
    assert adapt(first_order_run, out, "--adapter-only") == 0
    printed = capsys.readouterr().out
    assert "quadranet36_xxs (adapted from convnet36_xxs)" in printed and "top-1" in printed
    old, _ = ckpt.load_weights(first_order_run / "best.safetensors")
    for name in ("best", "last", "last_ema"):
        new, meta = ckpt.load_weights(out / f"{name}.safetensors")
        assert meta["config"]["model"] == "quadranet36_xxs" and meta["adapt"]["adapter_only"]
        fresh = create_model("quadranet36_xxs", num_classes=4, in_chans=1, **TINY)
        fresh.load_state_dict(new)
        for key, value in old.items():  # adapter mode: the trained weights are all still there
            kept = split_fused(new[key], value.shape[0])[2] if ".mixer." in key else new[key]
            assert torch.equal(kept.reshape(value.shape), value), key
    assert cli_main(["eval", "--checkpoint", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out


def test_the_same_adapt_command_gives_the_same_weights(first_order_run, tmp_path, capsys):
    """B's random init comes from --seed, not from whatever the process drew before."""
    weights = []
    for name in ("a", "b"):
        torch.randn(7)  # a different global random state before each command
        assert adapt(first_order_run, tmp_path / name) == 0
        weights.append(ckpt.load_weights(tmp_path / name / "last.safetensors")[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    capsys.readouterr()


def test_cli_channel_mode_trains_everything_and_load_adapted_rebuilds_it(
    first_order_run, tmp_path, capsys
):
    out = tmp_path / "adapted"
    assert adapt(first_order_run, out, "--channel", "--no-ema") == 0
    assert "load_adapted" in capsys.readouterr().out
    model = load_adapted(out / "last.safetensors").eval()
    assert isinstance(model.stages[0].blocks[0].mlp.fc1, QuadraticLinear)
    weights, meta = ckpt.load_weights(out / "last.safetensors")
    assert meta["config"]["model"] == "convnet36_xxs" and meta["adapt"]["channel"]
    old, _ = ckpt.load_weights(first_order_run / "best.safetensors")
    assert not torch.equal(weights["stem.0.weight"], old["stem.0.weight"])  # all weights train
    rebuilt = model.state_dict()
    assert set(rebuilt) == set(weights)
    assert all(torch.equal(rebuilt[k], v) for k, v in weights.items())
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    for command in (["eval", "--checkpoint", str(out)], ["push", str(out), "--to", str(out / "x")]):
        assert cli_main(command) == 2  # no registered model takes it: say what does
        assert "load_adapted('" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--checkpoint", "nowhere.safetensors"], "does not exist"),
        (["--model-kwargs", json.dumps({**TINY, "dims": [8, 16, 24]})], "does not fit"),
        (["--model", "quadranet36_xxs"], "already quadratic"),
        (["--epochs", "1", "--warmup-epochs", "20"], "warmup_epochs"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(first_order_run, tmp_path, capsys, flags, message):
    argv = ["adapt", "--checkpoint", str(first_order_run), "--epochs", "1"]
    argv += ["--warmup-epochs", "0", "--output", str(tmp_path / "x"), *QUIET_RECIPE, *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
