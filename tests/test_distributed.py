"""DDP on CPU (gloo): two ranks end with the weights of one process at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from quadranet.engine import TrainConfig, Trainer
from quadranet.engine import distributed as D
from quadranet.engine.report import read_metrics
from tiny_nets import TinyNet, driver_script

FAKE = {"num_classes": 4, "img_size": 8, "in_chans": 1, "length": 64, "val_length": 30}


DRIVER_MAIN = """
import json
import torch
from safetensors.torch import save_file
from quadranet.engine import TrainConfig, Trainer
from quadranet.engine import distributed as D
if __name__ == "__main__":
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    trainer = Trainer(cfg)
    trainer.fit()
    rank = trainer.dist.rank
    save_file(trainer.model.state_dict(), f"{cfg.output}/rank{rank}.safetensors")
    assert trainer.dist.world_size == 2 and torch.distributed.get_backend() == "gloo"
    D.cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(output, batch_size: int) -> dict:
    """Deterministic recipe: no augmentation, mixup or drop-path; shuffled by (seed, epoch)."""
    return dict(
        model="engine_tiny_net",
        dataset="fake",
        dataset_kwargs=FAKE,
        batch_size=batch_size,
        epochs=2,
        lr=0.05,
        warmup_epochs=0.5,
        smoothing=0.1,
        mixup=0.0,
        cutmix=0.0,
        randaugment=None,
        reprob=0.0,
        hflip=0.0,
        drop_path=0.0,
        ema=True,
        ema_decay=0.9,
        device="cpu",
        workers=0,
        quiet=True,
        output=str(output),
    )


def test_two_gloo_ranks_match_one_process(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(driver_script(DRIVER_MAIN))
    out = tmp_path / "ddp"
    out.mkdir()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    cfg = json.dumps(_config(out, batch_size=8))
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), cfg],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    single = Trainer(TrainConfig(**_config(tmp_path / "single", batch_size=16)))
    assert single.dist.world_size == 1 and single.steps_per_epoch == 4
    single.fit()

    rank0, rank1 = (load_file(out / f"rank{r}.safetensors") for r in range(2))
    reference = single.model.state_dict()
    assert not torch.allclose(reference["fc.weight"], TinyNet().fc.weight)  # it trained
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], reference[key], atol=1e-5, rtol=1e-5)

    # one writer; validation reduced over both ranks' shards equals the single process's
    ddp_metrics = read_metrics(out / "metrics.jsonl")
    single_metrics = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert len(ddp_metrics) == 2
    for ours, ref in zip(ddp_metrics, single_metrics):
        assert ours["step"] == ref["step"]
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-4), key


def test_single_process_helpers_need_no_process_group():
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.all_reduce_sum({"a": 1.5}, torch.device("cpu")) == {"a": 1.5}
    assert D.any_true(False, torch.device("cpu")) is False
    assert D.all_gather_objects({"x": 1}) == [{"x": 1}]
    info = D.init_distributed("cpu")
    assert info.world_size == 1 and info.is_main and info.device.type == "cpu"
