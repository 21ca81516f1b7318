"""Early stopping with Keras `EarlyStopping` semantics. The class lives in `lrjax.callbacks` (it is
a training callback); this module keeps the older import path working."""

from lrjax.callbacks import EarlyStopping

__all__ = ["EarlyStopping"]
