"""The seed article, step by step, with lrjax's Python API: a tutorial you can read top to bottom.

    python experiments/seed_article.py --data-dir ../shared/data/fashion_mnist --workdir runs/article

The article (a Keras chapter on MLPs) trains a 784-300-100-10 ReLU/softmax MLP on Fashion-MNIST:
it first grows the learning rate exponentially for one epoch while recording the loss, reads a rate
just below where the loss turns back up, then re-creates the model and trains it with SGD at that
rate for up to 100 epochs with early stopping, checkpoints and TensorBoard. Each step below is one
call into lrjax; every file lands in --workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import optax

import lrjax
from lrjax import plots
from lrjax.plots import save_samples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="IDX folder (default: $LRJAX_DATA_DIR or TFDS)")
    p.add_argument("--workdir", default="runs/article")
    p.add_argument("--epochs", type=int, default=100)
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # 1. The data: 55,000 training images, the first 5,000 of the official train split for validation,
    #    10,000 for test; pixels scaled to [0, 1].
    data = lrjax.load_dataset("fashion_mnist", a.data_dir)
    print(f"train {data.x_train.shape}, validation {data.x_valid.shape}, test {data.x_test.shape}")
    print("first training labels:", [data.class_names[i] for i in data.y_train[:5]])
    save_samples(data, workdir / "samples.png")  # the article's 4 x 10 grid of images

    # 2. The model: Flatten -> Dense(300, relu) -> Dense(100, relu) -> Dense(10) (softmax in the loss),
    #    Glorot-uniform weights as Keras initialises them.
    model = lrjax.mlp(data.in_features, (300, 100), data.num_classes, seed=42)

    # 3. The range test: SGD from 1e-3, x1.005 per batch of 32, one epoch, as one compiled program.
    #    Its result carries the curve, every suggestion method's rate and the divergence point.
    result = lrjax.find_lr(model, optax.sgd, data, batch_size=32, start_lr=1e-3, factor=1.005)
    result.save(workdir)  # lr_find.json / .csv / .png: loss vs lr on a log axis
    turn = float(result.lrs[np.argmin(result.smoothed)])
    print(f"the smoothed loss turns back up at lr {turn:.3g}; suggestions {result.suggestions}")
    lr = result.suggestion
    print(f"learning rate for training ({result.method}): {lr:.4g}")

    # 4. Re-create the model (fixed seed: same starting weights as before the range test) and train
    #    with early stopping on the validation loss (patience 20, best weights restored), Orbax
    #    checkpoints (latest and best) and TensorBoard curves, one compiled program per epoch.
    fresh = lrjax.mlp(data.in_features, (300, 100), data.num_classes, seed=42)
    fit = lrjax.fit(fresh, optax.sgd, data, lr=lr, epochs=a.epochs, batch_size=32, seed=42,
                    early_stopping=lrjax.EarlyStopping(monitor="val_loss", patience=20), workdir=workdir)
    print(f"{fit.epochs_run} epochs, best epoch {fit.best_epoch}; TensorBoard: tensorboard --logdir "
          f"{workdir / 'tensorboard'}")
    plots.plot_history(fit.history, workdir / "history.png")  # the article's learning curves

    # 5. Evaluate the best weights on the test set, then predict a few new images.
    test = fit.evaluate(data.x_test, data.y_test)
    print(f"test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f}")
    probs = jax.nn.softmax(fit.model()(data.x_test[:3]))
    print("predicted:", [data.class_names[i] for i in np.argmax(probs, -1)],
          "true:", [data.class_names[i] for i in data.y_test[:3]])


if __name__ == "__main__":
    main()
