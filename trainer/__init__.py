"""The GRPO algorithm: config, data, rewards, rollout, loss, the training loop, checkpoints.

Imports torch, transformers and peft; never the web, the database or the queue. Modules are
imported where used (``from trainer.loop import train``) so that ``trainer.config`` and the
reward spec checks stay importable without torch.
"""
