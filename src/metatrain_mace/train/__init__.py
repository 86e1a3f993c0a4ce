"""Training steps used by :class:`metatrain_mace.trainer.Trainer`: set-up and data
checks, baselines, data loading, the optimizer and MACE's recipe (EMA, stage two),
one epoch, metrics, distributed runs, and the training state that checkpoints save
and restarts restore."""
