"""The lab: HSCR and FiRe-MPO (rows of train.py's objective table), the benchmark, the sweep and the study,
and score.py's command line."""
