"""Side effects the loop calls around steps and evaluations: weight averaging, profiling, top-k
checkpoints."""
