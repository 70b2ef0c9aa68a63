"""tune.py's hyper-parameter search on Optuna: the YAML search space (space), the study's storage,
sampler, pruner and trial loop (study), one trial as one main.py training run in this process
(objective), and the trials table, trials.csv, best.yaml and plots (report)."""
