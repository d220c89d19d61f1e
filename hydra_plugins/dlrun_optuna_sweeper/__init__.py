"""dlrun's Optuna sweeper: Hydra instantiates plugins only from the `hydra_plugins` namespace."""
