"""Training: ``run_training`` (:mod:`medseg.training.trainer`) composed from small parts —
data preparation, patch sampling, optimizer/schedule, validation, logs and checkpoints."""
