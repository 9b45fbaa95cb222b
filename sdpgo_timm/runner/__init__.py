"""The training-script runner behind train.py and validate.py: arguments, builders, the loop, checkpoints,
resume, recovery, preemption and the run folder. Scripts import what they wire together from here."""
