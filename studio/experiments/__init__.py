"""The experiment runner: the synthetic-artifact paper's protocol from one TOML config (`config`), planned
as cached units (`plan`), run step by step as jobs (`runner`), each step's work (`dataset`, `steps`, with
`context`), the only calls into the engines (`adapter`) and the report (`report`).

May import: studio.store, studio.jobs, studio.services, studio.datasets, engines (through `adapter`).
"""
