"""The seed article's learning-rate range test in plain PyTorch, on one CPU thread.

    pip install -e '.[peers-torch]'   # torch, matplotlib; never part of lrjax's own set-up
    python experiments/peers/torch_range_test.py --data-dir ../shared/data/fashion_mnist --workdir runs/torch

The same test as keras_range_test.py, written the way a PyTorch user would without a framework on
top: `torch.set_num_threads(1)`, the 55,000 training images as one tensor sliced per batch through
a shuffled index tensor (no DataLoader), the 784-300-100-10 ReLU MLP with Keras's initialisation
(Glorot-uniform weights, zero biases), softmax cross-entropy (`F.cross_entropy` on the logits: the
softmax output and sparse categorical cross-entropy in one numerically stable call), SGD from 1e-3
with the rate x1.005 after every batch, one epoch at batch 32, stopped once the recorded loss
exceeds 4x the best seen (or is not finite).

What is recorded is what Keras records (and the article plots): the mean batch loss over the
epoch so far. Outputs and the suggestion rule are peer_common's, as for the Keras peer.
"""

from __future__ import annotations

import math
import sys
import time

from peer_common import BATCH, FACTOR, START_LR, STOP, load_train, parser, process_age_s, report


def main() -> int:
    a = parser(__doc__, "runs/torch_range_test").parse_args()
    phases = {"start-up (process start to main)": process_age_s()}

    t = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from torch import nn

    phases["import torch"] = time.perf_counter() - t
    torch.set_num_threads(1)
    t = time.perf_counter()
    x_np, y_np = load_train(a.data_dir)
    x_train, y_train = torch.from_numpy(x_np.reshape(len(x_np), -1)), torch.from_numpy(y_np)
    phases["data"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(a.seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):  # Keras's Dense defaults, not torch's Kaiming-uniform
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(model.parameters(), lr=START_LR)
    order = torch.randperm(len(x_train))
    rates, losses, best, total, lr = [], [], math.inf, 0.0, START_LR
    for step, start in enumerate(range(0, len(order), BATCH)):
        idx = order[start:start + BATCH]
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
        mean = total / (step + 1)  # the epoch's running mean, as Keras's logs["loss"]
        rates.append(lr)
        losses.append(mean)
        best = min(best, mean)
        lr *= FACTOR
        for group in opt.param_groups:
            group["lr"] = lr
        if not math.isfinite(mean) or mean > STOP * best:
            break
    phases["range test (steps)"] = time.perf_counter() - t
    return report("torch", rates, losses, len(x_train), a.workdir, phases, f"torch {torch.__version__}")


if __name__ == "__main__":
    sys.exit(main())
