"""Whole-step time of one model built from several source trees, side by side.

Used to decide whether a fast path pays: run the same model from a tree with it and a tree
without it, alternating child processes (one per measurement), and compare medians.
Each child imports `quadranet` from `<tree>/src`, builds the model with stochastic depth
0.1 (as the training engine trains), channels-last float32, and times a training step
(forward, backward, fused AdamW) and an inference batch.

    python benchmarks/compare_trees.py --tree old=/tmp/old --tree new=. --threads 2

A tree may carry model options as JSON after the path: `--tree none='.:{"recompute": "none"}'`;
`{"compile": true}` times `torch.compile(model)` (compilation happens in the warm-up calls);
`{"mlp_kernel": false}` runs every channel MLP through the ATen reference instead of the
chunked C++ operator (to check that the operator pays); `{"reparameterize": true}` infers a
copy made by `timm.utils.reparameterize_model` (the inference form, as the Table I bench).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from quadranet.bench.runner import allocator_env

CHILD = r"""
import json, sys, time, torch, timm
import quadranet  # noqa: F401  (registers the models)
name, batch, train_batch, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
options = json.loads(sys.argv[6])
compiled = options.pop("compile", False)
reparameterize = options.pop("reparameterize", False)
if not options.pop("mlp_kernel", True):
    from quadranet.ops import policy
    policy.MLP_MAX_CHANNELS = 0  # no map qualifies for the chunked MLP
torch.set_num_threads(threads)
torch.manual_seed(0)
cl = torch.channels_last
model = timm.create_model(name, drop_path_rate=0.1, **options).to(memory_format=cl)
run = torch.compile(model) if compiled else model
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
x = torch.randn(train_batch, 3, 224, 224).contiguous(memory_format=cl)
y = torch.randint(0, 1000, (train_batch,))

def train():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(run(x), y).backward()
    opt.step()

xi = torch.randn(batch, 3, 224, 224).contiguous(memory_format=cl)
infer_model = timm.utils.reparameterize_model(model).eval() if reparameterize else model  # a copy
run_infer = torch.compile(infer_model) if compiled and reparameterize else run

def infer():
    with torch.no_grad():
        run_infer(xi)

out = {}
for key, fn in (("train", train), ("infer", infer)):
    model.train(key == "train")
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    out[key] = sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def measure(spec: str, args: argparse.Namespace) -> dict[str, float]:
    path, _, options = spec.partition(":")
    tree = Path(path).resolve()
    env = allocator_env("retained", args.threads)
    env["PYTHONPATH"] = str(tree / "src")  # that tree's quadranet, not this one's
    cmd = [sys.executable, "-c", CHILD, args.model, str(args.batch), str(args.train_batch)]
    cmd += [str(args.steps), str(args.threads), options or "{}"]
    if args.cpus:
        cmd = ["taskset", "-c", args.cpus, *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The model, threads and batches of the timed steps (shared with ab_options.py)."""
    p.add_argument("--model", default="quadranet36_t")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="inference batch")
    p.add_argument("--train-batch", type=int, default=16)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """--output and --overwrite (shared with ab_options.py)."""
    help_ = "JSON file for the results (optional); the summary goes beside it as .txt"
    p.add_argument("--output", default="", help=help_)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def check_output(args: argparse.Namespace) -> None:
    """Refuse, before anything is timed, to replace earlier results without --overwrite."""
    if not args.output or args.overwrite:
        return
    for path in (Path(args.output), Path(args.output).with_suffix(".txt")):
        if path.exists():
            raise SystemExit(
                f"{path} exists: choose another --output, or pass --overwrite to replace it"
            )


def write_output(args: argparse.Namespace, record: dict, lines: list[str]) -> None:
    """The record as JSON at --output, and the command line and `lines` beside it as .txt."""
    if not args.output:
        return
    path = Path(args.output)
    path.write_text(json.dumps(record, indent=1) + "\n")
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    path.with_suffix(".txt").write_text("\n".join([f"$ {command}", *lines]) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tree", action="append", required=True, help="label=path[:model options as JSON]"
    )
    add_step_arguments(p)
    p.add_argument("--cpus", default="", help="taskset CPU list for the children (optional)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per child (median)")
    p.add_argument("--rounds", type=int, default=3, help="children per tree, alternating")
    add_output_arguments(p)
    args = p.parse_args(argv)
    check_output(args)
    trees = dict(t.split("=", 1) for t in args.tree)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    lines: list[str] = []
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for label in order:
            runs[label].append(measure(trees[label], args))
            lines.append(f"round {r + 1}/{args.rounds} {label}: {runs[label][-1]}")
            print(lines[-1], flush=True)
    first = next(iter(trees))
    summary = {}
    for label, results in runs.items():
        summary[label] = {k: statistics.median(r[k] for r in results) for k in ("train", "infer")}
    for label, s in summary.items():
        speed = {k: summary[first][k] / s[k] for k in s}
        lines.append(
            f"{label}: train {args.train_batch / s['train']:.2f} img/s, infer "
            f"{args.batch / s['infer']:.2f} img/s; speed vs {first}: train "
            f"{speed['train']:.3f}x, infer {speed['infer']:.3f}x"
        )
        print(lines[-1])
    write_output(args, dict(vars(args), runs=runs, summary=summary), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
