"""``musar bench``: forward, attention and training-step benchmarks as ratios against baselines
measured in the same run (bench/README.md at the repository root explains every field)."""
