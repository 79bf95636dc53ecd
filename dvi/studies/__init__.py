"""Studies: measurements that run the system or its parts and return a report (a dict the command prints
and writes): decoding benchmarks (bench, eval, profile), training (online, ablation), the drift study,
and the buffer and learner benchmarks. Each module imports its heavy dependencies itself."""
