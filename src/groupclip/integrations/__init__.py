"""groupclip with other training frameworks.

- :mod:`groupclip.integrations.transformers`: :class:`~groupclip.integrations.transformers.PrivateTrainer`, DP
  training with the Hugging Face ``Trainer`` (Poisson batches, per-sample losses, epsilon in the logs, privacy
  state in checkpoints; PEFT models included). Needs ``transformers`` and ``accelerate``.
- :mod:`groupclip.integrations.accelerate`: :func:`~groupclip.integrations.accelerate.make_private_accelerated`
  and :func:`~groupclip.integrations.accelerate.unwrap_optimizer`, for loops written with Hugging Face Accelerate
  (``make_private`` before or after ``accelerator.prepare``). Needs ``accelerate``.

The submodules import their framework when imported; importing this package imports neither. See
``docs/INTEGRATIONS.md`` for what each integration decides and why.
"""
