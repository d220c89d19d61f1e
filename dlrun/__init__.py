"""dlrun: config-driven training of the classic deep-learning networks."""

__version__ = "0.1.0"
