"""Training steps used by :class:`metatrain_mace.trainer.Trainer`: data checks and
loading, baselines, optimizer groups, MACE's recipe (EMA, stage two), metrics and
distributed runs."""
