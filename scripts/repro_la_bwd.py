"""Small repro for the illegal address seen in the linear-attention backward on the H200 (run under
compute-sanitizer): one forward+backward per head dim at a ragged T."""
import sys

import torch

from mmm.ops.linear_attention import linear_attention

for D in [int(a) for a in sys.argv[1:]] or [128]:
    for T in (300,):
        q, k, v = (torch.randn(1, T, 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        o = linear_attention(q, k, v, feature_map="elu", normalize=True, causal=True)
        o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        print("ok", D, T, flush=True)
