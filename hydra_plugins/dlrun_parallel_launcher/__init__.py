"""dlrun's parallel sweep launcher (`dlrun -m hydra/launcher=parallel ...`): Hydra instantiates
launchers only from the `hydra_plugins` namespace package, so it lives here, not in dlrun/."""
