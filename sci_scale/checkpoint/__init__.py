"""Checkpoints: what a run directory holds, how it is written, and how it is read back.

- ``index``: the ``latest`` pointer and ``step_NNNNNNN`` names, and ``CheckpointError``. It
  imports neither torch nor megatron, so ``sci-scale status`` and job scripts stay fast.
- ``state``: ``RunState`` (step, consumed samples, config, tokenizer identity) and reading it.
- ``manager``: writing checkpoints atomically (``CheckpointManager``, ``save_weights``) and
  loading weights, optimizer and RNG state into a run (``load_weights``,
  ``load_training_state``).
- ``load``: a checkpoint's whole model in one process for inference (evaluation, export).

This package imports none of its modules itself: importing ``index`` must not pull in torch.
"""
