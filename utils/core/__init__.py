"""The foundations every other package stands on: logging and the user-error type, options and the
config file, the names the command line offers, the checkpoint schema, atomic files, the device
and CPU policy, several processes (torchrun), the run folder and checkpoint files.
"""
