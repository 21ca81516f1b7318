"""The seed article's learning-rate range test in Keras (tensorflow-cpu), as its chapter writes it.

    pip install -e '.[peers-keras]'   # tensorflow-cpu, matplotlib; never part of lrjax's own set-up
    python experiments/peers/keras_range_test.py --data-dir ../shared/data/fashion_mnist --workdir runs/keras

The peer that `lrjax find-lr` is measured against (experiments/peers/compare.py): a 784-300-100-10
ReLU MLP with a softmax output, sparse categorical cross-entropy and SGD, trained for one epoch of
Fashion-MNIST's 55,000 training images (the official train split less its first 5,000, pixels / 255)
at batch 32 while a callback multiplies the learning rate by 1.005 after every batch from 1e-3,
records the loss Keras reports for each batch and stops training once that loss exceeds 4x the
best seen (or stops being finite). Writes lr_find.json (rates, losses) and lr_find.png (loss
against rate, log x) in --workdir, prints the suggested rate and the process's own wall time.

What is recorded: `logs["loss"]`, which Keras reports as the mean over the epoch so far (the
article plots exactly this curve). The suggestion rule is peer_common.suggestions' (two thirds of
the rate at the curve's minimum, lrjax's `seed` reading of the article; the minimum / 10 is in
the JSON too). The article's `metrics=["accuracy"]` and `validation_data` are left
out: the range test reads neither, and each would only slow this peer down.
"""

from __future__ import annotations

import math
import os
import sys
import time

from peer_common import BATCH, FACTOR, START_LR, STOP, load_train, parser, process_age_s, report


def main() -> int:
    a = parser(__doc__, "runs/keras_range_test").parse_args()
    phases = {"start-up (process start to main)": process_age_s()}

    t = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up banner, not the user's errors
    import keras

    phases["import keras"] = time.perf_counter() - t
    t = time.perf_counter()
    x_train, y_train = load_train(a.data_dir)
    phases["data"] = time.perf_counter() - t

    class ExponentialLearningRate(keras.callbacks.Callback):
        """The article's callback: record (rate, loss) per batch, then multiply the rate; here also
        the stop at 4x the best loss that ends the test once the loss has turned."""

        def __init__(self, factor: float, stop: float):
            super().__init__()
            self.factor, self.stop = factor, stop
            self.rates, self.losses, self.best = [], [], math.inf

        def on_train_batch_end(self, batch, logs=None):
            lr = self.model.optimizer.learning_rate
            loss = float(logs["loss"])
            self.rates.append(float(lr.numpy()))
            self.losses.append(loss)
            self.best = min(self.best, loss)
            lr.assign(lr * self.factor)
            if not math.isfinite(loss) or loss > self.stop * self.best:
                self.model.stop_training = True

    t = time.perf_counter()
    keras.utils.set_random_seed(a.seed)
    model = keras.Sequential([  # Dense's defaults: Glorot-uniform weights, zero biases
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(300, activation="relu"),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(learning_rate=START_LR))
    expon_lr = ExponentialLearningRate(FACTOR, STOP)
    model.fit(x_train, y_train, epochs=1, batch_size=BATCH, callbacks=[expon_lr], verbose=0)
    phases["range test (compile and steps)"] = time.perf_counter() - t
    return report("keras", expon_lr.rates, expon_lr.losses, len(x_train), a.workdir, phases,
                  f"keras {keras.__version__}")


if __name__ == "__main__":
    sys.exit(main())
