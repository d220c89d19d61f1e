"""The loop and its parts, shared by every task. The trainer base (`loop.Trainer`) holds its
parts, each given what it needs as arguments: the run folder (`run_folder`: checkpoints, resume,
metrics.json), the logger (`run_logger`: TensorBoard, progress bar, log lines), the placement
(`placement`), the optimisation (`optimize`) and its steps (`steps`), the evaluations
(`evaluation`), the early ends (`stops`, `guards`), the monitor, and the hooks (`engine.hooks`);
`loop_state` holds the small typed objects they share, `run_modes` what the modes share."""
