"""LESS decode on the GPU with launch 1 in 3, 2 and 1 pipeline stages at the layer bench's budget (2049 slots,
8B-like heads, bf16, 8 steps each from the reference's cache): the worst output error against the torch
reference per setting. Run from the repository root: ``python benchmarks/less_stages_probe.py``."""
import sys

import torch

sys.path.insert(0, "tests")
import test_less_kernels as T
from kvpress.kernels import less as K
from kvpress.kernels import less_reference as R
shape = dict(device="cuda", b=2, hq=32, hkv=8, d=128, n=512, length=2108, prompt=2100, splits=None)
for stages in (3, 2, 1):
    K.STEP_STAGES = stages
    for pol in (R.Policy(0, 1024, 1024), R.Policy(4, 0, 2044)):
        _, _, worst = T.run_both(pol, "kv", torch.bfloat16, resync=True, **shape)
        print("stages", stages, pol, "worst output error", round(worst, 4), flush=True)
