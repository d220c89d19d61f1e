"""Where and how runs start: run folders (`rundir`), sweeps that survive a failed trial (`sweep`),
SLURM jobs (`cluster`), and each run's share of the CPU threads (`threads`)."""
