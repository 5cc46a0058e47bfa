"""``robustkit harden``: adversarial training on one CPU, one GPU or many (torchrun + DDP).

- ``robustkit.harden.defences``: the training defences (pgd-at, fgsm-rs, atta, free, trades), each a
  ``Params`` dataclass and a per-batch step;
- ``robustkit.harden.step``: what a defence writes (its step, given a ``StepContext``);
- ``robustkit.harden.loop``: the one training loop they share (precision, DDP, schedule,
  checkpoints, resume, Ctrl-C), with ``batches`` (placement, sharding) and ``canary``
  (validation, best epoch, early stopping);
- ``robustkit.harden.api``: the whole command (load, audit before, train, audit after, write).
"""
