"""The loop and its parts, shared by every task: the trainer base (`trainer.Trainer`), optimisation,
precision, checkpoints and resume, the run log and TensorBoard helpers, stop signals, the monitor,
distributed helpers, and the hooks (`engine.hooks`) the loop calls around steps and evaluations."""
