"""Test settings: one intra-op thread keeps tiny-tensor tests fast and immune to
OpenMP spin-wait contention when other processes share the two cores; every test starts
from the same random state, so its outcome does not depend on which tests ran before it."""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses the tests start
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_state() -> None:
    """Seed torch, numpy and random before each test (models made without a seed, such as
    the quantization test's, would otherwise get weights that depend on the test order).
    QUADRANET_TEST_SEED=N runs the suite from another state, to find fragile tolerances."""
    seed = int(os.environ.get("QUADRANET_TEST_SEED", "0"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
