"""lrjax's default Transformer language model in plain PyTorch: a training epoch's steps, timed.

    pip install -e '.[peers-torch]'   # torch; never part of lrjax's own set-up
    python experiments/peers/torch_lm.py --windows W.npy --repeats 2   # W: int32 [steps, B, context + 1]

The architecture of `lrjax.models.Transformer` as a PyTorch user writes it: token embeddings plus
learned positions, pre-LayerNorm blocks (one fused qkv Linear, `F.scaled_dot_product_attention` with
`is_causal=True`, a 4x GELU MLP), a final LayerNorm, logits from the embedding table (tied), AdamW
(weight decay 0.1 on every parameter, as optax.adamw), `torch.set_num_threads(2)`. The batches are
the windows the bench hands over (the ones lrjax trains on). One untimed warm-up epoch, then
`--repeats` timed epochs; prints one JSON line {"epoch_s": [...], "first_loss", "last_loss", "torch"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", required=True)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    windows = torch.from_numpy(np.load(a.windows).astype(np.int64))
    context, d, h = windows.shape[-1] - 1, a.d_model, a.heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3 * h, d // h).transpose(1, 2).split(h, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(att)
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, d)
            self.positions = nn.Parameter(torch.randn(context, d) * 0.02)
            self.blocks = nn.ModuleList([Block() for _ in range(a.layers)])
            self.ln = nn.LayerNorm(d)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

        def forward(self, tokens):
            x = self.embed(tokens) + self.positions[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.ln(x) @ self.embed.weight.T

    model = Transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)

    def epoch():
        losses = []
        for batch in windows:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return [float(x) for x in losses]

    first = epoch()  # warm-up
    times, last = [], first
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        last = epoch()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"epoch_s": times, "first_loss": first[0], "last_loss": last[-1], "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
