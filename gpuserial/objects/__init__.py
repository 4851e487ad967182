"""The Chainer-style objects whose state is saved: links and parameters (``link``), optimizers
and their update rules (``optimizers``), and the trainer with its updater, iterator, triggers
and snapshots (``training``)."""
