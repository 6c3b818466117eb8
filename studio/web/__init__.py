"""The web UI: `ui.build_ui(services)` composes the tabs (`tabs/`), the named scripting API (`api`), and
what the server shows to whom (`exposure`); `catalog` lists the models found on disk.

May import: every other studio package and engines; nothing imports studio.web except app.py.
"""
