"""The foundations every other package stands on: logging and the user-error type (log), the config
file and the parser (config), the resolved options (options), the names the command line offers
(names), the task types (task), the checkpoint schema (schema), atomic files (files), the device
and CPU policy (device), several processes under torchrun (distributed), the run folder (run) and
reading and writing checkpoints (checkpoint).
"""
