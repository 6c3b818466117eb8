"""Everything a person touches: the session store, datasets, jobs, the CLI, the experiment runner and the
web UI. Imports engines (never the other way) and is imported by app.py only.

Top-level modules shared by the packages: `services` (the data directory, the store and lazily built
engines), `jobs` (long work as supervised subprocesses), `tasks` (in-process work owned by the server),
`doctor` (checking and repairing a data directory), `safeio` (write discipline, one-sentence failures).
"""
