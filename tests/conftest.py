"""Test settings: one intra-op thread keeps tiny-tensor tests fast and immune to
OpenMP spin-wait contention when other processes share the two cores."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses the tests start
torch.set_num_threads(1)
