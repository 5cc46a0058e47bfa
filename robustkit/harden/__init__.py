"""``robustkit harden``: adversarial training on one CPU, one GPU or many (torchrun + DDP).

- ``robustkit.harden.defences``: the training defences (pgd-at, fgsm-rs, atta, free, trades), each a
  ``Params`` dataclass and a per-batch step;
- ``robustkit.harden.engine``: the one training loop they share (precision, data placement,
  canary, checkpoints, resume, Ctrl-C);
- ``robustkit.harden.api``: the whole command (load, audit before, train, audit after, write).
"""
