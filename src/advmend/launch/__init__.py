"""Launching work through a scheduler with submitit: a study as one job per (row, seed)
(`study_jobs`), one training over several nodes (`train_job`), on SLURM or as local processes
(`executor`); `ledger` remembers which job runs which run, and what became of it.

The study runner stays the one owner of a run: each job calls it for its one run, so records, claims
and exact resume are the runner's, whichever way the run was started.
"""
