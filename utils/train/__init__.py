"""Training: what a run is made of before any model exists and its options resolved once (setup),
the trainer that builds a run from them (trainer), the epoch loop (engine), losses, distillation,
EMA/SWA, optimizers, learning-rate schedules, the training state of last.pt (state), the checkpoint
saver, the epoch log and experiment trackers.
"""
