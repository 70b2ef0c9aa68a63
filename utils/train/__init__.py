"""Training: the trainer that builds a run from its options, the epoch loop, losses, distillation,
EMA/SWA, optimizers, learning-rate schedules, the training state of last.pt, the checkpoint
saver, the epoch log and experiment trackers.
"""
