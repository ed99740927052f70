"""ProxylessNAS-style search: the engine trains the supernet's weights, alphas train in between.

Every engine training step first (after `arch_warmup_epochs` weight-only epochs) takes one
architecture step on a held-out batch (a slice of the train split the weights never see):
the mixed ops run with binary gates (two paths by default), the loss is the cross-entropy
combined with the expected latency of the current distribution,

    mul_log: CE * (log E[lat] / log T) ** beta            (E[lat], T in ms; T > 1 ms)
    hinge:   CE + lambda * max(0, E[lat] / T - 1)

and Adam updates alpha. Then the engine's own step trains the weights of one path sampled
from softmax(alpha). The result is the argmax architecture (`Supernet.derive`).
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from quadranet.data import InMemoryImageDataset
from quadranet.data import dataset_info as get_dataset_info
from quadranet.engine import TrainConfig, Trainer
from quadranet.engine.config import ConfigError
from quadranet.engine.train import InMemoryLoader, _dataset_kwargs, build_scheduler
from quadranet.models.quadranet_nas import Arch
from quadranet.nas.latency import LatencyTable
from quadranet.nas.space import Supernet

LOSS_FORMS = ("mul_log", "hinge")
DERIVE = ("argmax", "budget")
ARCH_SAMPLING = ("two_path", "one_path")
LOG_NAME = "search_log.jsonl"
ARCH_NAME = "arch.json"


@dataclass
class SearchOptions:
    """What `quadranet search` adds to the training flags."""

    target_ms: float
    loss: str = "mul_log"
    beta: float = 0.6
    latency_lambda: float = 1.0
    arch_lr: float = 6e-3
    arch_sampling: str = "two_path"
    arch_warmup_epochs: int = 1
    holdout: float = 0.2
    layer_scale_init: float = 1e-6
    derive: str = "argmax"
    budget_fraction: float = 0.9

    def __post_init__(self) -> None:
        if not (self.target_ms > 0 and math.isfinite(self.target_ms)):
            raise ValueError(f"target_ms must be a positive number of ms, got {self.target_ms}")
        if self.loss not in LOSS_FORMS:
            raise ValueError(f"loss must be one of {list(LOSS_FORMS)}, got {self.loss!r}")
        if self.loss == "mul_log" and self.target_ms <= 1.0:
            raise ValueError(
                f"the mul_log loss divides by log(target) and needs target_ms > 1 ms (got "
                f"{self.target_ms}); use --loss hinge for sub-millisecond targets"
            )
        if self.arch_sampling not in ARCH_SAMPLING:
            raise ValueError(f"arch_sampling must be one of {list(ARCH_SAMPLING)}")
        if not 0 < self.holdout < 1:
            raise ValueError(
                f"holdout is a fraction of the train split in (0, 1), got {self.holdout}"
            )
        if self.arch_lr <= 0 or self.beta <= 0 or self.latency_lambda < 0:
            raise ValueError("arch_lr and beta must be > 0 and latency_lambda >= 0")
        if self.derive not in DERIVE:
            raise ValueError(f"derive must be one of {list(DERIVE)}, got {self.derive!r}")
        if not 0 <= self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")
        if self.arch_warmup_epochs < 0:
            raise ValueError("arch_warmup_epochs must be >= 0")


def latency_loss(
    ce: torch.Tensor,
    expected_ms: torch.Tensor,
    target_ms: float,
    form: str = "mul_log",
    beta: float = 0.6,
    lam: float = 1.0,
) -> torch.Tensor:
    """The architecture loss: CE combined with the expected latency against the target."""
    if form == "mul_log":
        # Below 1 ms log(E) would turn negative; there the latency term stops pulling.
        ratio = torch.log(expected_ms.clamp_min(1.0 + 1e-6)) / math.log(target_ms)
        return ce * ratio**beta
    if form == "hinge":
        return ce + lam * F.relu(expected_ms / target_ms - 1.0)
    raise ValueError(f"unknown latency loss {form!r}; choose one of {list(LOSS_FORMS)}")


class SearchTrainer(Trainer):
    """The engine's Trainer with a supernet, a held-out split and architecture steps."""

    def __init__(self, cfg: TrainConfig, table: LatencyTable, options: SearchOptions) -> None:
        info = get_dataset_info(cfg.dataset, cfg.data_root, **_dataset_kwargs(cfg))
        table.check_compatible(
            img_size=cfg.img_size or info.img_size,
            in_chans=info.in_chans,
            num_classes=info.num_classes,
        )
        self.table, self.options = table, options
        self._resumed_search: dict[str, Any] | None = None  # set by --resume, applied below
        torch.manual_seed(cfg.seed)  # the same supernet weights for the same seed
        supernet = Supernet(table.space, layer_scale_init=options.layer_scale_init)
        super().__init__(cfg, supernet)
        self.supernet: Supernet = supernet
        self.paths = torch.Generator().manual_seed(cfg.seed)  # the same paths on every rank
        self.lat_vectors = [
            torch.tensor(table.latency_vector(stage, op.choices), device=self.device)
            for (stage, _), op in zip(table.space.positions(), supernet.mixed_ops())
        ]
        self.arch_optimizer = torch.optim.Adam(
            supernet.arch_parameters(), lr=options.arch_lr, betas=(0.0, 0.999), eps=1e-8
        )
        self._split_holdout()
        if self.dist.distributed:  # weight steps run one path: the others get no gradient
            self.train_model = None
            gc.collect()
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=True
            )
        self.search_log: list[dict[str, Any]] = [self._snapshot(epoch=0)]
        if self._resumed_search is not None:
            self._apply_search_state(self._resumed_search)

    # -- data ----------------------------------------------------------------------------------

    def _split_holdout(self) -> None:
        """Hold out a fixed slice of the train split for architecture steps."""
        cfg, loader = self.cfg, self.train_loader
        dataset = _loader_dataset(loader)
        n = len(dataset)
        n_hold = max(int(round(self.options.holdout * n)), cfg.batch_size)
        if n - n_hold < cfg.batch_size:
            raise ConfigError(
                f"the train split has {n} images: too few to hold out {n_hold} for architecture "
                f"steps and keep a batch of {cfg.batch_size}; lower --holdout or --batch-size"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.train_loader, self.train_sampler = self._subset_loader(loader, order[n_hold:], True)
        self.arch_loader, self.arch_sampler = self._subset_loader(loader, order[:n_hold], False)
        batches = len(self.train_loader)
        if cfg.limit_train_batches is not None:
            batches = min(batches, cfg.limit_train_batches)
        self.steps_per_epoch = batches // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError("no optimizer step fits in an epoch after the hold-out split")
        self.batches_per_epoch = self.steps_per_epoch * cfg.accum_steps
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scheduler.step_update(self.step)  # a new scheduler resets the lr; resume keeps it
        self._arch_batches: Iterator | None = None
        self._arch_epoch = 0
        self._arch_pos = 0  # batches taken from the open hold-out pass
        self._arch_skip = 0  # batches to skip when the next pass opens (resume)

    def _subset_loader(self, loader: Any, indices: list[int], augment: bool) -> tuple[Any, Any]:
        cfg, world, rank = self.cfg, self.dist.world_size, self.dist.rank
        if isinstance(loader, InMemoryLoader):
            idx = torch.tensor(indices, device=loader.images.device)
            subset = InMemoryImageDataset(loader.images[idx].cpu(), loader.targets[idx].cpu())
            sampler = DistributedSampler(subset, world, rank, shuffle=True, seed=cfg.seed)
            new = InMemoryLoader(
                subset,
                sampler,
                cfg.batch_size,
                self.info,
                self.device,
                train=True,
                img_size=cfg.img_size,
                crop_padding=cfg.crop_padding if augment else 0,
                hflip=cfg.hflip if augment else 0.0,
                reprob=cfg.reprob if augment else 0.0,
            )
            return new, sampler
        subset = Subset(loader.dataset, indices)
        sampler = DistributedSampler(subset, world, rank, shuffle=True, seed=cfg.seed)
        new = DataLoader(
            subset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        return new, sampler

    def _next_arch_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next held-out batch, cycling through the hold-out split."""
        for _ in range(2):
            if self._arch_batches is None:
                self.arch_sampler.set_epoch(self._arch_epoch)
                if isinstance(self.arch_loader, DataLoader):  # worker seeds from the pass, not
                    # the global RNG: reopening a pass on resume draws nothing from it
                    seed = self.cfg.seed * 100_003 + self._arch_epoch
                    self.arch_loader.generator = torch.Generator().manual_seed(seed)
                self._arch_epoch += 1
                self._arch_batches = iter(self.arch_loader)
                for _ in range(self._arch_skip):  # where the resumed run left this pass
                    next(self._arch_batches)
                self._arch_pos, self._arch_skip = self._arch_skip, 0
            try:
                batch = next(self._arch_batches)
            except StopIteration:
                self._arch_batches = None
                continue
            self._arch_pos += 1
            return batch
        raise ConfigError("the hold-out split holds no full batch; lower --batch-size")

    # -- checkpoints ---------------------------------------------------------------------------

    def training_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The engine's state plus the search's: alpha's optimizer, the path sampler, the
        place in the hold-out split and the log, so that `--resume` continues exactly."""
        state = super().training_state(rng)
        state["search"] = {
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "paths": self.paths.get_state(),
            "arch_epoch": self._arch_epoch,
            "arch_open": self._arch_batches is not None,
            "arch_pos": self._arch_pos,
            "search_log": self.search_log,
        }
        return state

    def restore_extra_state(self, state: dict[str, Any], path: Path) -> None:
        search = state.get("search")
        if search is None:
            raise ConfigError(
                f"{path} is a plain training state without the search's state (architecture "
                "optimizer, path sampler, hold-out position); resume it with `quadranet "
                "train`, or start the search again without --resume"
            )
        self._resumed_search = search  # applied once the search's parts exist

    def _apply_search_state(self, search: dict[str, Any]) -> None:
        self.arch_optimizer.load_state_dict(search["arch_optimizer"])
        self.paths.set_state(search["paths"])
        if search["arch_open"]:  # reopen the same pass and skip what was used
            self._arch_epoch, self._arch_skip = search["arch_epoch"] - 1, search["arch_pos"]
        else:
            self._arch_epoch = search["arch_epoch"]
        self.search_log = list(search["search_log"])
        self._resumed_search = None

    # -- the search ----------------------------------------------------------------------------

    def expected_latency(self) -> torch.Tensor:
        """E[lat] in ms under softmax(alpha): fixed parts + sum of p . lat at every position."""
        total = torch.tensor(self.table.fixed_ms, device=self.device)
        for op, lat in zip(self.supernet.mixed_ops(), self.lat_vectors):
            total = total + (op.probs * lat).sum()
        return total

    def arch_step(self) -> float:
        """One update of alpha on a held-out batch; returns the architecture loss."""
        x, y = self._to_device(*self._next_arch_batch())
        alphas = self.supernet.arch_parameters()
        before = [a.detach().clone() for a in alphas]
        self.supernet.sample(self.options.arch_sampling, self.paths)
        with self._autocast():
            logits = self.model(x)
        ce = F.cross_entropy(logits.float(), y)
        o = self.options
        loss = latency_loss(
            ce, self.expected_latency(), o.target_ms, o.loss, o.beta, o.latency_lambda
        )
        grads = torch.autograd.grad(loss, alphas, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(alphas, grads)]
        if self.dist.distributed:
            flat = torch.cat(grads)
            dist.all_reduce(flat)
            grads = list((flat / self.dist.world_size).split([a.numel() for a in alphas]))
        for a, g in zip(alphas, grads):
            a.grad = g
        self.arch_optimizer.step()
        for a in alphas:
            a.grad = None
        if o.arch_sampling == "two_path":
            rescale_two_path(self.supernet, before)
        return float(loss.detach())

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An architecture step (after the warm-up), then the weights of one sampled path."""
        if self.epoch >= self.options.arch_warmup_epochs:
            self.arch_step()
        self.supernet.sample("sample", self.paths)
        return super().training_step(x, y)

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        record = super().train_one_epoch(epoch)
        if self.batch:  # pre-empted inside the epoch: its snapshot comes when it is finished
            return record
        snap = self._snapshot(epoch + 1)
        self.search_log.append({**snap, "train_loss": record["train_loss"]})
        self.log(
            f"search epoch {epoch + 1}: E[lat] {snap['expected_ms']:.3f} ms (target "
            f"{self.options.target_ms:g} ms), argmax arch {snap['derived_ms']:.3f} ms"
        )
        return {**record, "expected_ms": snap["expected_ms"], "derived_ms": snap["derived_ms"]}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Validation of the argmax architecture."""
        for net in (model, self.model):
            if isinstance(net, Supernet):
                net.sample("argmax")
        return super().validate(model)

    def _snapshot(self, epoch: int) -> dict[str, Any]:
        """Probabilities, expected latency and the argmax architecture now."""
        arch = self.supernet.derive()
        return {
            "epoch": epoch,
            "expected_ms": float(self.expected_latency().detach()),
            "target_ms": self.options.target_ms,
            "derived_ms": self.table.predict(arch),
            "derived": [list(s) for s in arch.stages],
            "probs": self.supernet.probabilities(),
        }


def rescale_two_path(supernet: Supernet, before: list[torch.Tensor]) -> None:
    """Shift the two updated logits so the unsampled paths keep their probabilities."""
    with torch.no_grad():
        for op, old in zip(supernet.mixed_ops(), before):
            if op.mode != "two_path" or len(op.active) != 2:
                continue
            idx = list(op.active)
            offset = torch.logsumexp(old[idx], 0) - torch.logsumexp(op.alpha[idx], 0)
            op.alpha[idx] += offset


def derive_within_budget(
    supernet: Supernet,
    table: LatencyTable,
    target_ms: float,
    fraction: float = 0.9,
    meta: dict[str, Any] | None = None,
    resolution: int = 400,
) -> Arch:
    """The most probable architecture whose predicted latency lies in [fraction * T, T].

    The product of the positions' probabilities is maximised by dynamic programming over
    latency (in steps of T / resolution). A short search leaves flat distributions whose
    per-position argmax is far cheaper than the target; this uses the budget instead. When
    no architecture reaches the band, the most probable one under T is returned, and when
    none fits under T, the cheapest.
    """
    space = supernet.space
    step = target_ms / resolution
    budget = target_ms - table.fixed_ms
    slots = int(budget / step) + 1 if budget >= 0 else 0
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    ops = supernet.mixed_ops()
    for (stage, _), op in zip(space.positions(), ops):
        logp = torch.log_softmax(op.alpha.detach().float(), 0).tolist()
        costs = [round(ms / step) for ms in table.latency_vector(stage, op.choices)]
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (score, picks) in best.items():
            for c, (lp, cost) in enumerate(zip(logp, costs)):
                key = used + cost
                if key < slots and (key not in nxt or nxt[key][0] < score + lp):
                    nxt[key] = (score + lp, picks + [c])
        best = nxt
    low = (fraction * target_ms - table.fixed_ms) / step
    band = [v for k, v in best.items() if k >= low] or list(best.values())
    if band:
        picks = max(band, key=lambda v: v[0])[1]
    else:  # nothing fits under the target: the cheapest architecture
        picks = [
            int(torch.tensor(table.latency_vector(stage, op.choices)).argmin())
            for (stage, _), op in zip(space.positions(), ops)
        ]
    names = iter(op.choices[c] for op, c in zip(ops, picks))
    stages = [[next(names) for _ in range(depth)] for depth in space.max_depths]
    return space.arch(stages, meta)


def _loader_dataset(loader: Any) -> Any:
    if isinstance(loader, InMemoryLoader):
        return loader.images
    return loader.dataset


@dataclass
class SearchResult:
    """What a search produced."""

    arch: Arch
    arch_path: Path
    log_path: Path
    plots: list[Path]
    predicted_ms: float


def search(
    cfg: TrainConfig, table: LatencyTable, options: SearchOptions, table_path: str | None = None
) -> SearchResult:
    """Run the search and write arch.json, search_log.jsonl and the plots into the run folder."""
    trainer = SearchTrainer(cfg, table, options)
    trainer.fit()
    meta = {
        "target_ms": options.target_ms,
        "table": table_path,
        "setting": asdict(table.setting),
        "machine": table.env.get("machine"),
        "space": table.space.to_dict(),
        "search": asdict(options),
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
    }
    if options.derive == "budget":
        arch = derive_within_budget(
            trainer.supernet, table, options.target_ms, options.budget_fraction, meta
        )
    else:
        arch = trainer.supernet.derive(meta)
    arch.meta["predicted_ms"] = table.predict(arch)
    out = trainer.output_dir
    arch_path = out / ARCH_NAME
    log_path = out / LOG_NAME
    plots: list[Path] = []
    if trainer.dist.is_main:
        arch.save(arch_path)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in trainer.search_log))
        plots = plot_search(trainer.search_log, trainer.supernet, out)
    return SearchResult(arch, arch_path, log_path, plots, arch.meta["predicted_ms"])


def plot_search(log: list[dict[str, Any]], supernet: Supernet, out: Path) -> list[Path]:
    """probs.png (probabilities per position over epochs) and latency.png (E[lat] vs target)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in log]
    ops = supernet.mixed_ops()
    positions = list(supernet.space.positions())
    cols = max(supernet.space.max_depths)
    rows = len(supernet.space.dims)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for k, ((stage, pos), op) in enumerate(zip(positions, ops)):
        ax = axes[stage][pos]
        ax.set_visible(True)
        for c, name in enumerate(op.choices):
            ax.plot(epochs, [r["probs"][k][c] for r in log], marker=".", label=name)
        ax.set_title(f"stage {stage} position {pos}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch", fontsize=8)
    handles, labels = max(
        (ax.get_legend_handles_labels() for ax in axes.flat if ax.get_visible()),
        key=lambda hl: len(hl[1]),
    )
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle("architecture probabilities per position", fontsize=11)
    probs_path = out / "probs.png"
    fig.savefig(probs_path, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    ax.plot(epochs, [r["expected_ms"] for r in log], marker="o", label="expected latency")
    ax.plot(epochs, [r["derived_ms"] for r in log], marker="s", label="argmax architecture")
    ax.axhline(log[0]["target_ms"], color="k", ls="--", label="target")
    ax.set_xlabel("epoch")
    ax.set_ylabel("latency (ms, from the table)")
    ax.legend()
    ax.grid(alpha=0.3)
    latency_path = out / "latency.png"
    fig.savefig(latency_path, dpi=90)
    plt.close(fig)
    return [probs_path, latency_path]
