"""Hardware-aware search: architectures, latency tables, mixed ops, the search loop, the CLI."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
from torch import nn

from quadranet.cli import main
from quadranet.engine import TrainConfig
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.config import ConfigError
from quadranet.models import create_model
from quadranet.models.quadranet_nas import Arch, load_arch
from quadranet.nas.latency import LatencyTable, LatencyTableError, Setting, fixed_part_names
from quadranet.nas.search import SearchOptions, SearchTrainer, latency_loss, rescale_two_path
from quadranet.nas.space import MixedOp, SearchSpace, Supernet
from tiny_nets import signal_after_step

FAKE = {"num_classes": 4, "img_size": 8, "in_chans": 1, "length": 96, "val_length": 16}
SPACE = SearchSpace("quadra", dims=(4, 8), max_depths=(2, 2), img_size=8, in_chans=1, num_classes=4)


def synthetic_table(space: SearchSpace = SPACE) -> LatencyTable:
    """A table with known times: a block costs 0.1 * k * e ms (+ 0.05 ms per stage index)."""
    fixed = {name: {"ms": 0.2} for name in fixed_part_names(space)}
    blocks = {}
    for stage in range(len(space.dims)):
        blocks[f"stage{stage}"] = {}
        for name in space.candidates:
            _, k, e = name.split("_")
            ms = 0.1 * int(k[1:]) * int(e[1:]) + 0.05 * stage
            shape = list(space.stage_shape(stage))
            blocks[f"stage{stage}"][name] = {"ms": ms, "input_shape": shape}
    return LatencyTable(space, Setting(), fixed, blocks, {"date": "test"}, "synthetic")


# --- architectures -----------------------------------------------------------------------------


def test_arch_json_round_trip_builds_model(tmp_path):
    arch = SPACE.random_arch(random.Random(1))
    path = arch.save(tmp_path / "arch.json")
    again = load_arch(path)
    assert again.to_dict() == arch.to_dict()
    model = create_model("quadranet_nas", arch=str(path), num_classes=4, in_chans=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert blocks == sum(arch.depths)  # identity positions hold no module


@pytest.mark.parametrize(
    "change, field",
    [
        ({"space": "conv"}, "arch.space"),
        ({"dims": [4, 0]}, "arch.dims"),
        ({"stages": [["quadra_k3_e2"]]}, "arch.stages has 1 stages"),
        ({"stages": [["quadra_k3_e2"], ["quadra_k4_e2"]]}, "arch.stages[1][0]"),
        ({"stages": [["quadra_k3_e2"], ["mbconv_k3_e6"]]}, "arch.stages[1][0]"),
        ({"stem_stride": 3}, "arch.stem_stride"),
        ({"colour": "red"}, "unknown field"),
        ({"format": "v0"}, "arch.format"),
    ],
)
def test_bad_arch_names_the_field(change, field):
    good = {"space": "quadra", "dims": [4, 8], "stages": [["quadra_k3_e2"], ["identity"]]}
    Arch.from_dict(good)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        create_model("quadranet_nas", arch={**good, **change})


def test_arch_outside_space_is_rejected():
    with pytest.raises(ValueError, match=r"arch.stages\[0\]\[0\] = 'identity' is not a choice"):
        SPACE.arch([["identity", "quadra_k3_e2"], ["quadra_k3_e2", "identity"]])
    with pytest.raises(ValueError, match="quadranet_nas needs arch"):
        create_model("quadranet_nas")


# --- latency tables ----------------------------------------------------------------------------


def test_a_space_too_small_for_its_input_says_what_to_change():
    with pytest.raises(ValueError, match=r"leaves no pixels.*fewer stages or stem_stride=1"):
        SearchSpace("quadra", dims=(4, 8, 16), max_depths=(1, 1, 1), stem_stride=2, img_size=4)
    with pytest.raises(ValueError, match=r"fewer stages$"):  # stride 1 already: not suggested
        SearchSpace("quadra", dims=(4, 8, 16, 32), max_depths=(1, 1, 1, 1), img_size=4)


def test_table_round_trip(tmp_path):
    table = synthetic_table()
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.to_dict() == table.to_dict()
    assert again.space == SPACE and again.setting == table.setting


def _broken(mutate):
    data = synthetic_table().to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["blocks"]["stage1"].pop("quadra_k5_e4"), "'quadra_k5_e4' of stage1"),
        (lambda d: d["fixed"].pop("head"), r"fixed part\(s\) \['head'\] missing"),
        (lambda d: d["blocks"]["stage0"]["quadra_k3_e2"].update(ms=-1), "must be >= 0"),
        (lambda d: d["blocks"]["stage0"]["quadra_k3_e2"].update(ms="fast"), "finite number"),
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d.pop("setting"), "'setting' missing"),
        (lambda d: d["setting"].update(backend="tvm"), "backend must be one of"),
        (lambda d: d["space"].update(depth=3), "unknown search space field"),
        (
            lambda d: d["blocks"]["stage1"]["quadra_k3_e2"].update(input_shape=[1, 8, 8, 8]),
            r"measured at input \[1, 8, 8, 8\]",
        ),
    ],
)
def test_malformed_tables_are_rejected(mutate, message):
    with pytest.raises(LatencyTableError, match=message):
        LatencyTable.from_dict(_broken(mutate), source="t.json")


def test_mismatched_table_is_rejected(tmp_path):
    table = synthetic_table()
    with pytest.raises(LatencyTableError, match="img_size=8 but the search uses img_size=16"):
        table.check_compatible(img_size=16)
    other = Arch("quadra", (4, 16), (("quadra_k3_e2",), ("quadra_k3_e2",)))
    with pytest.raises(LatencyTableError, match=r"dims \(4, 16\)"):
        table.predict(other)
    with pytest.raises(LatencyTableError, match="no latency for block 'quadra_k9_e2' in stage1"):
        table.block_ms(1, "quadra_k9_e2")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LatencyTableError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="latency profile"):
        LatencyTable.load(tmp_path / "missing.json")


def test_derived_arch_builds_and_table_sum_is_its_prediction():
    table = synthetic_table()
    net = Supernet(SPACE)
    torch.manual_seed(0)
    for op in net.mixed_ops():
        op.alpha.data = torch.randn_like(op.alpha) * 3
    arch = net.derive()
    expected = table.fixed_ms + sum(
        table.block_ms(s, name) for s, names in enumerate(arch.stages) for name in names
    )
    assert table.predict(arch) == pytest.approx(expected)
    model = create_model("quadranet_nas", arch=arch.to_dict(), num_classes=4, in_chans=1)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 4)
    # with (near) one-hot probabilities the expected latency is the derived one
    for op in net.mixed_ops():
        op.alpha.data = torch.nn.functional.one_hot(op.alpha.argmax(), len(op.alpha)) * 60.0
    latency = table.fixed_ms + sum(
        float((op.probs.detach() * torch.tensor(table.latency_vector(s, op.choices))).sum())
        for (s, _), op in zip(SPACE.positions(), net.mixed_ops())
    )
    assert latency == pytest.approx(table.predict(net.derive()), rel=1e-5)


# --- mixed op and gradients --------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def toy_op() -> MixedOp:
    """Three paths: x (good for target 2x), -x (bad), 0.5x (in between)."""
    op = MixedOp(["quadra_k3_e2", "quadra_k5_e2", "quadra_k7_e2"], dim=2)
    op.candidates = nn.ModuleList([Scale(1.0), Scale(-1.0), Scale(0.5)])
    return op


def test_two_path_gradients_have_the_right_sign_and_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3)
    seen = set()
    for _ in range(30):
        op = toy_op()
        op.sample("two_path", gen)
        assert len(op.active) == 2 and sorted(op.gates) == [0.0, 1.0]
        out = op(x)
        on = op.active[op.gates.index(1.0)]
        assert torch.equal(out, op.candidates[on](x))  # the value is the gated path only
        loss = ((out - 2 * x) ** 2).sum()
        loss.backward()
        grad = op.alpha.grad
        i, j = op.active
        # ProxylessNAS: dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i), p over the pair
        dy = 2 * (out - 2 * x)
        dg = torch.stack([(dy * op.candidates[k](x)).sum() for k in (i, j)])
        p = torch.softmax(op.alpha.detach()[[i, j]], 0)
        manual = torch.stack(
            [sum(dg[b] * p[b] * (float(a == b) - p[a]) for b in range(2)) for a in range(2)]
        )
        torch.testing.assert_close(grad[[i, j]], manual)
        unsampled = ({0, 1, 2} - {i, j}).pop()
        assert grad[unsampled] == 0
        ranked = sorted((i, j), key=lambda k: [1.0, -1.0, 0.5][k], reverse=True)
        assert grad[ranked[0]] < 0 < grad[ranked[1]]  # the better path gains probability
        seen.add((i, j))
    assert len(seen) > 1


def test_one_path_and_rescaling():
    op = toy_op()
    x = torch.randn(2, 2, 3, 3)
    op.sample("one_path", torch.Generator().manual_seed(1))
    ((op(x) - 2 * x) ** 2).sum().backward()
    assert (op.alpha.grad != 0).all()  # one path reaches every logit through softmax
    net = Supernet(SPACE)
    before = [a.detach().clone() for a in net.arch_parameters()]
    net.sample("two_path", torch.Generator().manual_seed(2))
    for op in net.mixed_ops():
        op.alpha.data[list(op.active)] += torch.tensor([0.5, -0.2])
    rescale_two_path(net, before)
    for op, old in zip(net.mixed_ops(), before):
        rest = [k for k in range(len(old)) if k not in op.active]
        torch.testing.assert_close(op.probs[rest], torch.softmax(old, 0)[rest])


def test_sample_mode_leaves_alpha_without_gradient():
    net = Supernet(SPACE)
    net.sample("sample", torch.Generator().manual_seed(0))
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(a.grad is None for a in net.arch_parameters())
    assert any(p.grad is not None for p in net.weight_parameters())


def test_latency_loss_forms():
    ce = torch.tensor(2.0)
    e = torch.tensor(4.0)
    assert float(latency_loss(ce, e, 4.0, "mul_log")) == pytest.approx(2.0)
    assert float(latency_loss(ce, e, 8.0, "hinge", lam=3.0)) == pytest.approx(2.0)
    assert float(latency_loss(ce, e, 2.0, "hinge", lam=3.0)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="target_ms > 1 ms"):
        SearchOptions(target_ms=0.5)


# --- the search loop ---------------------------------------------------------------------------


def plain_config(output, **overrides) -> dict:
    """Engine settings for tiny fake-data runs: no augmentation, EMA or warm-up."""
    cfg = dict(
        dataset="fake",
        dataset_kwargs=FAKE,
        warmup_epochs=0,
        mixup=0,
        cutmix=0,
        randaugment=None,
        reprob=0,
        hflip=0,
        ema=False,
        device="cpu",
        workers=0,
        quiet=True,
        channels_last=False,
        output=str(output),
    )
    return {**cfg, **overrides}


def _search_alphas(tmp_path, options: SearchOptions, steps: int = 12) -> tuple[list, float, float]:
    """Run `steps` architecture steps; (alphas, E[lat] before, E[lat] after)."""
    output = tmp_path / f"run{options.target_ms}{options.loss}"
    cfg = TrainConfig.from_dict(plain_config(output, epochs=1, batch_size=16, seed=3))
    trainer = SearchTrainer(cfg, synthetic_table(), options)
    start = float(trainer.expected_latency().detach())
    for _ in range(steps):
        trainer.arch_step()
    alphas = [a.detach().clone() for a in trainer.supernet.arch_parameters()]
    return alphas, start, float(trainer.expected_latency().detach())


def test_tight_target_moves_probability_to_cheaper_blocks(tmp_path):
    common = dict(loss="hinge", arch_lr=0.05, layer_scale_init=1.0)
    free, start, e_free = _search_alphas(
        tmp_path, SearchOptions(10.0, latency_lambda=0.0, **common)
    )
    tight, _, e_tight = _search_alphas(tmp_path, SearchOptions(1.0, latency_lambda=5.0, **common))
    loose, _, e_loose = _search_alphas(tmp_path, SearchOptions(50.0, latency_lambda=5.0, **common))
    assert start > 1.0 and e_tight < start - 0.5 and e_tight < e_free - 0.5
    table = synthetic_table()
    for (stage, pos), a, f in zip(SPACE.positions(), tight, free):
        lat = torch.tensor(table.latency_vector(stage, SPACE.choices(pos)))
        assert (torch.softmax(a, 0) * lat).sum() < (torch.softmax(f, 0) * lat).sum()
    # a loose target leaves the hinge inactive: the search is the latency-free one
    for a, f in zip(loose, free):
        torch.testing.assert_close(a, f)
    # the multiplicative form pulls harder the tighter the target
    mul = dict(loss="mul_log", beta=2.0, arch_lr=0.05, layer_scale_init=1.0)
    _, _, e_mul_tight = _search_alphas(tmp_path, SearchOptions(1.2, **mul))
    _, _, e_mul_loose = _search_alphas(tmp_path, SearchOptions(50.0, **mul))
    assert e_mul_tight < e_mul_loose


def test_search_resumes_exactly(tmp_path, monkeypatch):
    """Stopping after an epoch and resuming gives the uninterrupted search's weights, alphas,
    log and architecture: alpha's Adam state, the path sampler and the place in the
    hold-out split are in the checkpoint."""
    options = SearchOptions(target_ms=2.0, arch_warmup_epochs=0, arch_lr=0.05)
    common = dict(epochs=2, batch_size=8, seed=5, lr=1e-3)

    def run(output, stop_after=None, resume=None):
        cfg = TrainConfig.from_dict(plain_config(output, resume=resume, **common))
        trainer = SearchTrainer(cfg, synthetic_table(), options)
        trainer.fit(lambda t, record: stop_after is not None and t.epoch == stop_after)
        return trainer

    full = run(tmp_path / "full")
    first = run(tmp_path / "part", stop_after=1)
    assert first.epoch == 1 and first._arch_batches is not None and first._arch_pos == 1
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part"))
    assert resumed.epoch == 2
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed.search_log == full.search_log
    assert resumed.supernet.derive().stages == full.supernet.derive().stages
    # pre-empted inside the second epoch: that epoch is logged once, when it is finished
    from quadranet.engine.train import Preempted

    plain_steps = signal_after_step(monkeypatch, lambda t: t.step == t.steps_per_epoch + 1)
    with pytest.raises(Preempted):
        run(tmp_path / "mid")
    plain_steps()
    assert run(tmp_path / "mid", resume=str(tmp_path / "mid")).search_log == full.search_log


def test_search_refuses_a_state_without_the_search_part(tmp_path):
    options = SearchOptions(target_ms=2.0)
    run = tmp_path / "run"
    SearchTrainer(TrainConfig.from_dict(plain_config(run, epochs=1, batch_size=16)),
                  synthetic_table(), options).fit()  # fmt: skip
    path = run / ckpt.STATE_NAME
    state = ckpt.load_state(path)
    del state["search"]
    torch.save(state, path)
    cfg = TrainConfig.from_dict(plain_config(run, epochs=2, batch_size=16, resume=str(run)))
    with pytest.raises(ConfigError, match="without the search's state"):
        SearchTrainer(cfg, synthetic_table(), options)


# --- command line ------------------------------------------------------------------------------


def test_cli_profile_check_search_train(tmp_path, capsys):
    table = tmp_path / "table.json"
    data = ["--dataset", "fake", "--dataset-kwargs"] + [f"{k}={v}" for k, v in FAKE.items()]
    assert (
        main(
            [
                "latency",
                "profile",
                "--dataset",
                "fake",
                "--img-size",
                "8",
                "--dims",
                "4,8",
                "--max-depths",
                "1,2",
                "--warmup",
                "0",
                "--repeats",
                "2",
                "--chain",
                "1",
                "-o",
                str(table),
            ]
        )
        == 0
    )
    loaded = LatencyTable.load(table)
    assert loaded.env["torch"] == torch.__version__ and loaded.setting.threads == 1
    assert loaded.space.in_chans == 3  # the fake dataset's default channels
    assert (
        main(["latency", "check", str(table), "--samples", "2", "-o", str(tmp_path / "check.json")])
        == 0
    )
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["measured_ms"] > 0 for r in rows)
    # a table for 3-channel 32 px input cannot drive a search on 1-channel 8 px data
    assert main(["search", "--table", str(table), "--target-ms", "5", *data]) == 2
    assert "in_chans=3 but the search uses in_chans=1" in capsys.readouterr().err

    synthetic = synthetic_table()
    synthetic.save(tmp_path / "syn.json")
    out = tmp_path / "search"
    assert (
        main(
            [
                "search",
                "--space",
                "quadra",
                "--table",
                str(tmp_path / "syn.json"),
                "--target-ms",
                "3",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--arch-warmup-epochs",
                "1",
                "--output",
                str(out),
                "--no-channels-last",
                "--quiet",
                *data,
            ]
        )
        == 0
    )
    arch = load_arch(out / "arch.json")
    assert arch.meta["predicted_ms"] == pytest.approx(synthetic.predict(arch))
    log = [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and len(log[0]["probs"]) == 4
    assert (out / "probs.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0
    assert (
        main(
            [
                "search",
                "--space",
                "mbconv",
                "--table",
                str(tmp_path / "syn.json"),
                "--target-ms",
                "3",
                *data,
            ]
        )
        == 2
    )

    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--arch",
                str(out / "arch.json"),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--warmup-epochs",
                "0",
                "--mixup",
                "0",
                "--cutmix",
                "0",
                "--randaugment",
                "none",
                "--no-ema",
                "--quiet",
                "--output",
                str(tmp_path / "retrain"),
                *data,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "measured latency" in printed and "target 3 ms" in printed
    cfg = yaml_config(tmp_path / "retrain" / "config.yaml")
    assert cfg["model"] == "quadranet_nas" and cfg["arch"] == str(out / "arch.json")
    # the run keeps its architecture: eval finds it with the search folder gone
    assert (tmp_path / "retrain" / "model_arch.json").read_bytes() == (
        out / "arch.json"
    ).read_bytes()
    shutil.rmtree(out)
    assert main(["eval", "--checkpoint", str(tmp_path / "retrain")]) == 0
    assert "top-1" in capsys.readouterr().out


def yaml_config(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_supernet_copies_are_independent():
    net = Supernet(SPACE)
    clone = copy.deepcopy(net)
    clone.mixed_ops()[0].alpha.data += 1
    assert not torch.equal(clone.mixed_ops()[0].alpha, net.mixed_ops()[0].alpha)


DDP_DRIVER = """
import json, sys
import torch
from safetensors.torch import save_file
from quadranet.engine import TrainConfig
from quadranet.engine import distributed as D
from quadranet.nas.latency import LatencyTable
from quadranet.nas.search import SearchOptions, SearchTrainer

cfg = TrainConfig(**json.loads(sys.argv[1]))
trainer = SearchTrainer(cfg, LatencyTable.load(sys.argv[2]), SearchOptions(target_ms=2.0))
trainer.fit()
assert trainer.dist.world_size == 2 and trainer.train_model.find_unused_parameters
state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
save_file(state, f"{cfg.output}/rank{trainer.dist.rank}.safetensors")
D.cleanup()
"""


def test_supernet_search_under_two_gloo_ranks(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    synthetic_table().save(tmp_path / "t.json")
    out = tmp_path / "ddp"
    out.mkdir()
    cfg = plain_config(out, epochs=2, batch_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), json.dumps(cfg), str(tmp_path / "t.json")],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    rank0, rank1 = (load_file(out / f"rank{r}.safetensors") for r in range(2))
    alphas = [k for k in rank0 if k.endswith(".alpha")]
    assert alphas and any(rank0[k].abs().sum() > 0 for k in alphas)  # the alphas moved
    for key in rank0:  # weights and alphas stay identical on both ranks
        assert torch.equal(rank0[key], rank1[key]), key


def test_budget_derivation_is_the_most_probable_architecture_in_the_band():
    import itertools

    from quadranet.nas.search import derive_within_budget

    table = synthetic_table()
    net = Supernet(SPACE)
    torch.manual_seed(4)
    for op in net.mixed_ops():
        op.alpha.data = torch.randn_like(op.alpha)
    ops = net.mixed_ops()
    logps = [torch.log_softmax(op.alpha.detach(), 0) for op in ops]
    target = 5.0
    best = None
    for picks in itertools.product(*(range(len(op.choices)) for op in ops)):
        names = [op.choices[c] for op, c in zip(ops, picks)]
        arch = SPACE.arch([names[:2], names[2:]])
        ms = table.predict(arch)
        logp = sum(float(lp[c]) for lp, c in zip(logps, picks))
        if 0.9 * target <= ms <= target and (best is None or logp > best[0]):
            best = (logp, arch.stages)
    found = derive_within_budget(net, table, target, 0.9, resolution=4000)
    assert 0.9 * target <= table.predict(found) <= target
    assert found.stages == best[1]
    cheapest = derive_within_budget(net, table, 0.1)  # nothing fits: the cheapest network
    assert table.predict(cheapest) == pytest.approx(latency_floor(table))


def latency_floor(table: LatencyTable) -> float:
    """Predicted ms of the cheapest architecture of the table's space."""
    return table.fixed_ms + sum(
        min(table.latency_vector(s, table.space.choices(p))) for s, p in table.space.positions()
    )
