"""Model level: published sizes, timm's model API, bad-input errors."""

import json

import pytest
import timm
import torch

import quadranet
from quadranet.bench.measure import count_macs, count_params, saved_tensor_bytes
from quadranet.blocks import MixerBlock, QuadraBlock
from quadranet.models import create_model, list_models
from quadranet.models.quadranet import QuadraNet, checkpoint_filter_fn
from quadranet.nn import QuadraticConv2d

# DESIGN.md section 3 (1000 classes): exact counts where given, else to the 0.01M shown.
PUBLISHED_PARAMS = {
    "quadranet36_xxs": 1.85e6,
    "quadranet36_xs": 6.39e6,
    "quadranet36_t": 23_598_824,
    "quadranet36_s": 51.62e6,
    "quadranet36_b": 90.45e6,
    "quadranet25_xxs": 1.30e6,
    "quadranet25_xs": 4.45e6,
    "quadranet25_t": 16_286_632,
    "quadranet25_s": 35.51e6,
    "quadranet25_b": 62.13e6,
    "convnet36_t": 22_696_424,
}


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_paper(name):
    n = count_params(meta_model(name))
    expected = PUBLISHED_PARAMS[name]
    if isinstance(expected, int):
        assert n == expected
    else:
        assert round(n / 1e6, 2) == pytest.approx(expected / 1e6)


def test_hornet_t_matches_published_size():
    model = meta_model("hornet_t")
    assert count_params(model) == pytest.approx(22.4e6, rel=0.01)
    assert count_macs(model, 224) == pytest.approx(3.97e9, rel=0.01)


def test_quadranet36_t_macs():
    # FlopCounterMode: conv + linear multiply-accumulates at 224x224, one image.
    assert count_macs(meta_model("quadranet36_t"), 224) == pytest.approx(4.1e9, rel=0.03)


def test_first_order_twin_differs_only_in_the_spatial_branch():
    q, c = meta_model("quadranet36_t"), meta_model("convnet36_t")
    blocks = 3 * 64 + 3 * 128 + 27 * 256 + 3 * 512  # sum of block widths
    # The quadratic conv holds three k x k depthwise kernels + biases, the twin one.
    assert count_params(q) - count_params(c) == 2 * blocks * (7 * 7 + 1)


def test_registered_with_timm():
    names = set(timm.list_models("quadranet*") + timm.list_models("convnet*"))
    assert {n for n in list_models() if not n.startswith("hornet")} <= names
    assert set(timm.list_models("hornet*")) >= {"hornet_t", "hornet_s", "hornet_b"}


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_at_a_small_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return timm.create_model("quadranet25_xxs", num_classes=7).eval()


def test_timm_api_shapes(small_model):
    x = torch.randn(2, 3, 64, 64)
    feats = small_model.forward_features(x)
    assert feats.shape == (2, 128, 2, 2)
    assert small_model.forward_head(feats, pre_logits=True).shape == (2, 128)
    assert small_model.forward_head(feats).shape == (2, 7)
    assert small_model.num_features == 128
    assert small_model.get_classifier().out_features == 7
    info = small_model.feature_info
    assert [f["num_chs"] for f in info] == [16, 32, 64, 128]
    assert [f["reduction"] for f in info] == [4, 8, 16, 32]


def test_reset_classifier():
    model = timm.create_model("quadranet25_xxs").eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 128, 2, 2)
    model.reset_classifier(11, "avg")
    assert model(x).shape == (2, 11)


def test_features_only_through_timm():
    model = timm.create_model("quadranet25_xxs", features_only=True, out_indices=(1, 3))
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 32, 8, 8), (1, 128, 2, 2)]
    assert model.feature_info.channels() == [32, 128]
    assert model.feature_info.reduction() == [8, 32]


@pytest.mark.parametrize("name", ["quadranet25_xxs", "hornet_t"])
def test_grad_checkpointing_keeps_less_and_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, depths=(1, 1, 2, 1))
    x = torch.randn(2, 3, 32, 32)
    params = tuple(model.parameters())
    kept = saved_tensor_bytes(lambda: model(x).sum().backward(), exclude=params)
    ref = [p.grad.clone() for p in params]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = saved_tensor_bytes(lambda: model(x).sum().backward(), exclude=params)
    assert checkpointed < kept / 2
    for g, p in zip(ref, params):
        torch.testing.assert_close(p.grad, g)
    model.set_grad_checkpointing(False)
    assert saved_tensor_bytes(lambda: model(x), exclude=params) == kept


def test_grad_checkpointing_recomputes_on_the_forward_kernel_route():
    """The forward runs with the kernels off, the backward outside that setting: the
    recomputation must take the forward's route (checkpoint refuses a different one)."""
    model = timm.create_model("quadranet25_xxs", num_classes=3, depths=(1, 1, 2, 1))
    model = model.to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with quadranet.ops.kernels("off"):
        loss = model(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_images_with_stem_stride():
    model = timm.create_model("quadranet25_xxs", in_chans=1, num_classes=10, stem_stride=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.feature_info[-1]["reduction"] == 8
    for stride in (0, 3):  # refused before the input size is worked out from it
        with pytest.raises(ValueError, match=f"stem_stride must be 1, 2 or 4, got {stride}"):
            timm.create_model("quadranet25_xxs", stem_stride=stride)


def test_kwargs_reach_the_blocks():
    model = timm.create_model("quadranet25_xxs", kernel_size=5, mlp_ratio=2.0, recompute="full")
    conv = model.stages[0].blocks[0].mixer
    assert conv.kernel_size == (5, 5) and model.stages[0].blocks[0].recompute == "full"
    assert model.stages[0].blocks[0].mlp.fc1.out_features == 32


def _naive_forward(self, x):
    """Plain-autograd quadratic conv: three convolutions, a * b + c."""
    wa, wb, wc = self.branch_weights()
    ba, bb, bc = (t.reshape(-1) for t in self.bias.view(self.groups, 3, -1).unbind(1))
    args = dict(stride=self.stride, padding=self.padding, groups=self.groups)
    conv = torch.nn.functional.conv2d
    return conv(x, wa, ba, **args) * conv(x, wb, bb, **args) + conv(x, wc, bc, **args)


@pytest.mark.parametrize("recompute", ["cheap", "full"])
def test_recomputing_model_equals_plain_autograd(monkeypatch, recompute):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for option in (recompute, "none"):
        if option == "none":  # the reference: no custom op, no recomputation
            monkeypatch.setattr(QuadraBlock, "spatial", MixerBlock.spatial)
            monkeypatch.setattr(QuadraticConv2d, "forward", _naive_forward)
        torch.manual_seed(0)
        model = timm.create_model(
            "quadranet25_xxs", num_classes=4, recompute=option, layer_scale_init=0.3
        ).double()
        out = model(x)
        out.square().sum().backward()
        results.append([out] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_family_recomputes_cheap_parts_by_default():
    model = timm.create_model("quadranet25_xxs")
    assert all(b.recompute == "cheap" for s in model.stages for b in s.blocks)
    model = timm.create_model("quadranet25_xxs", recompute="none")
    assert model.stages[0].blocks[0].recompute == "none"
    assert timm.create_model("hornet_t").stages[0].blocks[0].recompute == "none"


def test_wrong_channel_count_says_what_to_do(small_model):
    with pytest.raises(ValueError, match="in_chans=1"):
        small_model(torch.randn(1, 1, 64, 64))


def test_too_small_image_names_the_minimum_and_stem_stride(small_model):
    with pytest.raises(ValueError, match=r"at least 32x32.*stem_stride"):
        small_model(torch.randn(1, 3, 28, 28))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="quadranet36_t"):
        create_model("quadranet36_tt")
    with pytest.raises(ValueError, match="quadranet models"):
        quadranet.create_model("no_such_model_at_all")


@pytest.mark.parametrize("k", [4, 0, -3])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="positive odd"):
        timm.create_model("quadranet25_xxs", kernel_size=k)


def test_option_a_block_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="does not take"):
        QuadraNet(depths=(1, 1), dims=(32, 64), block="swin", kernel_size=5)


def test_pretrained_is_refused_clearly():
    with pytest.raises(ValueError, match="pretrained=False"):
        timm.create_model("quadranet36_t", pretrained=True)


def test_constructor_kwargs_override_the_variant():
    model = timm.create_model("quadranet25_xxs", depths=(1, 1), dims=(8, 16), num_classes=3)
    assert [len(s.blocks) for s in model.stages] == [1, 1]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    hornet = timm.create_model("hornet_t", depths=(1, 1, 1, 1), num_classes=2)
    assert [len(s.blocks) for s in hornet.stages] == [1, 1, 1, 1]


# --- loading weights the timm way ---------------------------------------------------------

SMALL_HORNET = dict(depths=(1, 1, 2, 1))  # every gnConv order, a second block in stage 3


def _randomized(model):
    """`model` in eval mode with every parameter random, so a misplaced tensor shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _to_official_hornet(state_dict):
    """Rename this project's hornet_* keys to the official HorNet repository's names."""
    mlp = {"mlp.norm": "norm2", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "stem":
            new = "downsample_layers.0." + ".".join(parts[1:])
        elif parts[0] == "head":
            new = ("norm." if parts[1] == "norm" else "head.") + parts[2]
        elif parts[2] == "downsample":
            new = f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
        else:  # stages.{i}.blocks.{j}.<rest>
            rest = ".".join(parts[4:])
            if rest == "mlp.gamma":
                rest = "gamma2"
            elif rest.startswith("mixer."):
                rest = "gnconv." + rest[len("mixer.") :]
            elif rest.rsplit(".", 1)[0] in mlp:
                module, leaf = rest.rsplit(".", 1)
                rest = f"{mlp[module]}.{leaf}"
            new = f"stages.{parts[1]}.{parts[3]}.{rest}"
        out[new] = value
    return out


def _to_official_quadranet(state_dict, dims):
    """Rename quadranet_* keys to the official QuadraNet code's names: the fused quadratic
    conv becomes QuadraConv.conv1/conv2/conv3 and the channel MLP 1x1 convs."""
    out = {}
    for key, value in _to_official_hornet(state_dict).items():
        parts = key.split(".")
        if ".gnconv." in key:  # the spatial mixer: split the fused (a, b, c) rows
            dim = dims[int(parts[1])]
            branches = value.view(dim, 3, *value.shape[1:]).unbind(1)
            for n, branch in enumerate(branches, 1):
                out[f"stages.{parts[1]}.{parts[2]}.QuadraConv.conv{n}.{parts[-1]}"] = branch
        elif parts[-2] in ("pwconv1", "pwconv2") and parts[-1] == "weight":
            out[key] = value[:, :, None, None]  # as an nn.Conv2d 1x1 weight
        else:
            out[key] = value
    return out


def test_hornet_loads_an_official_hornet_checkpoint(tmp_path):
    source = _randomized(timm.create_model("hornet_t", **SMALL_HORNET))
    official = _to_official_hornet(source.state_dict())
    for key in (
        "downsample_layers.0.1.bias",
        "downsample_layers.3.1.weight",
        "stages.2.1.gnconv.pws.2.weight",
        "stages.3.0.gnconv.dwconv.bias",
        "stages.0.0.gamma1",
        "stages.0.0.gamma2",
        "stages.1.0.pwconv2.bias",
        "norm.weight",
        "head.bias",
    ):
        assert key in official
    path = tmp_path / "hornet_tiny_7x7.pth"
    torch.save({"model": official, "epoch": 300}, path)
    _assert_loads_equal("hornet_t", path, source, **SMALL_HORNET)


def _assert_loads_equal(name, path, source, **kwargs):
    """timm.create_model(name, pretrained=True) from `path` computes exactly what `source`
    does."""
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        assert torch.isfinite(expected).all()
        assert torch.equal(model(x), expected)


def test_quadranet_loads_its_own_safetensors_checkpoint(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _randomized(timm.create_model("quadranet36_xxs"))
    path = tmp_path / "quadranet36_xxs.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    _assert_loads_equal("quadranet36_xxs", path, source)


def test_quadranet_loads_an_official_quadranet_state_dict():
    kwargs = dict(depths=(1, 1, 1, 1))
    source = _randomized(timm.create_model("quadranet25_xxs", **kwargs))
    official = _to_official_quadranet(source.state_dict(), dims=(16, 32, 64, 128))
    assert official["stages.2.0.QuadraConv.conv3.weight"].shape == (64, 1, 7, 7)
    assert official["stages.2.0.pwconv1.weight"].shape == (256, 64, 1, 1)
    wrapped = {"state_dict": {"module." + k: v for k, v in official.items()}}
    model = timm.create_model(
        "quadranet25_xxs",
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=wrapped),
        num_classes=5,  # a new classifier: the checkpoint's is dropped
        **kwargs,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), source.forward_features(x))
        assert torch.equal(model.head.norm.weight, source.head.norm.weight)
    assert model(x).shape == (2, 5)


def test_local_dir_prefix_loads_through_timm(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _randomized(timm.create_model("quadranet25_xxs", depths=(1, 1, 1, 1)))
    safetensors_torch.save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    config = {"architecture": "quadranet25_xxs", "num_classes": 1000, "pretrained_cfg": {}}
    config["model_args"] = {"depths": [1, 1, 1, 1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_hf_hub_prefix_loads_through_timm(monkeypatch):
    """`hf-hub:` names go through timm's own cfg handling (the hub calls stubbed: offline)."""
    pytest.importorskip("huggingface_hub")
    source = _randomized(timm.create_model("hornet_t", **SMALL_HORNET))
    official = _to_official_hornet(source.state_dict())

    def config_from_hub(model_id, cache_dir=None):
        cfg = dict(hf_hub_id=model_id, source="hf-hub", num_classes=1000, classifier="head.fc")
        return cfg, "hornet_t", {"depths": list(SMALL_HORNET["depths"])}

    def weights_from_hub(model_id, *args, **kwargs):
        assert model_id == "someone/hornet_t"
        return {"model": official}

    monkeypatch.setattr("timm.models._factory.load_model_config_from_hf", config_from_hub)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", weights_from_hub)
    model = timm.create_model("hf-hub:someone/hornet_t", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("name", ["hornet_t", "quadranet36_xxs", "convnet25_t"])
def test_pretrained_without_a_source_says_how_to_load_a_file(name):
    with pytest.raises(ValueError, match=rf"no pretrained weights are published for {name}") as e:
        timm.create_model(name, pretrained=True)
    assert "pretrained_cfg_overlay=dict(file=" in str(e.value)


def test_checkpoint_filter_keeps_own_layout_and_unwraps_containers():
    model = timm.create_model("quadranet25_xxs", depths=(1, 1, 1, 1))
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model) is own
    wrapped = {"model_ema": {"module." + k: v for k, v in own.items()}, "epoch": 3}
    unwrapped = checkpoint_filter_fn(wrapped, model)
    assert list(unwrapped) == list(own)
    assert all(unwrapped[k] is v for k, v in own.items())


def test_checkpoint_filter_names_the_first_unmatched_key():
    model = timm.create_model("quadranet25_xxs", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"'backbone\.conv1\.weight'.*neither"):
        checkpoint_filter_fn({"backbone.conv1.weight": torch.zeros(1)}, model)
    hornet = _to_official_hornet(timm.create_model("hornet_t", **SMALL_HORNET).state_dict())
    with pytest.raises(ValueError, match=r"'stages\.0\.0\.gnconv\.proj_in\.weight'.*mixer"):
        checkpoint_filter_fn(hornet, model)


# --- forward_intermediates / prune_intermediate_layers -------------------------------------


def test_forward_intermediates_are_the_stage_outputs(small_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = small_model.forward_intermediates(x)
        manual, y = [], small_model.stem(x)
        for stage in small_model.stages:
            y = stage(y)
            manual.append(y)
        assert len(feats) == 4
        for a, b in zip(feats, manual):
            assert torch.equal(a, b)
        assert torch.equal(final, small_model.forward_features(x))
        only = small_model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        assert torch.equal(only[0], manual[1]) and torch.equal(only[1], manual[3])
        last2 = small_model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last2] == [64, 128]
        final, early = small_model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        assert torch.equal(final, manual[2]) and torch.equal(early[1], manual[2])


def test_forward_intermediates_match_features_only():
    torch.manual_seed(0)
    model = timm.create_model("hornet_t", **SMALL_HORNET).eval()
    weights = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=model.state_dict()))
    features = timm.create_model("hornet_t", features_only=True, **weights, **SMALL_HORNET)
    getter = timm.create_model(
        "hornet_t", features_only=True, feature_cls="getter", **weights, **SMALL_HORNET
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        for outs in (features.eval()(x), getter.eval()(x)):
            assert len(outs) == 4
            for a, b in zip(outs, expected):
                assert torch.equal(a, b)


def test_prune_intermediate_layers_then_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("quadranet25_xxs", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 2])
        assert kept == [0, 2]
        assert len(model.stages) == 3 and model.num_features == 64
        final, feats = model.forward_intermediates(x, indices=kept)
        assert torch.equal(feats[0], full[0]) and torch.equal(feats[1], full[2])
        assert torch.equal(final, full[2])
        assert model(x).shape == (2, 64, 4, 4)  # the head is gone: the unpooled map


def test_prune_only_the_head():
    model = timm.create_model("quadranet25_xxs", num_classes=7).eval()
    assert model.prune_intermediate_layers(indices=1) == [3]
    assert len(model.stages) == 4 and model.num_classes == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (last,) = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert torch.equal(model(x), last)


# --- pretrained_cfg follows the model's input ------------------------------------------


@pytest.mark.parametrize(
    "kwargs, input_size, pool_size",
    [
        ({}, (3, 224, 224), (7, 7)),
        ({"in_chans": 1}, (1, 224, 224), (7, 7)),
        ({"stem_stride": 2}, (3, 112, 112), (7, 7)),
        ({"stem_stride": 1, "in_chans": 1}, (1, 56, 56), (7, 7)),
        ({"img_size": 64}, (3, 64, 64), (2, 2)),
        ({"img_size": (64, 96), "in_chans": 4}, (4, 64, 96), (2, 3)),
    ],
)
def test_pretrained_cfg_follows_in_chans_stem_stride_and_img_size(kwargs, input_size, pool_size):
    model = meta_model("quadranet36_t", **kwargs)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == input_size and cfg["pool_size"] == pool_size
    assert cfg["first_conv"] == "stem.0" and model.default_cfg is cfg
    assert len(cfg["mean"]) == len(cfg["std"]) == input_size[0]
    if input_size[0] != 3:  # timm's rule: the channels' mean of the ImageNet statistics
        assert cfg["mean"][0] == pytest.approx(sum(timm.data.IMAGENET_DEFAULT_MEAN) / 3)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == input_size
    assert timm.data.resolve_input_data_config(model)["input_size"] == input_size


def test_pretrained_cfg_of_features_only_and_a_saved_cfg():
    features = meta_model("quadranet25_xxs", features_only=True, in_chans=1, stem_stride=1)
    assert features.pretrained_cfg["input_size"] == (1, 56, 56)
    saved = dict(meta_model("quadranet25_xxs", stem_stride=1).pretrained_cfg)
    again = meta_model("quadranet25_xxs", stem_stride=1, pretrained_cfg=saved)
    assert again.pretrained_cfg["input_size"] == (3, 56, 56)  # not scaled a second time


# --- save_for_hf: timm's hub layout --------------------------------------------------------


def test_save_for_hf_round_trips_through_local_dir(tmp_path):
    kwargs = dict(in_chans=1, num_classes=10, stem_stride=1, depths=(1, 1, 1, 1))
    source = _randomized(timm.create_model("quadranet25_xxs", **kwargs))
    folder = quadranet.save_for_hf(source, tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "quadranet25_xxs" and config["num_classes"] == 10
    assert config["model_args"]["stem_stride"] == 1 and config["model_args"]["in_chans"] == 1
    assert config["pretrained_cfg"]["input_size"] == [1, 56, 56]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.pretrained_cfg["input_size"] == (1, 56, 56)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_save_for_hf_keeps_a_searched_architecture(tmp_path):
    arch = {
        "space": "quadra",
        "dims": [8, 16],
        "stem_stride": 2,
        "stages": [["quadra_k3_e2"], ["quadra_k5_e2", "identity"]],
    }
    source = _randomized(timm.create_model("quadranet_nas", arch=arch, num_classes=3))
    folder = quadranet.save_for_hf(source, tmp_path / "nas")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
