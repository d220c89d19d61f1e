"""dlrun's SLURM launcher: Hydra's submitit launcher whose requeued jobs resume by themselves."""
