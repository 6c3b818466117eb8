"""The session store: SQLite (sqlite-utils, WAL, migrations) plus content-addressed image and mask files.
The only writer of session data.

May import: studio.safeio and engines' pure helpers; never the web, CLI or jobs.
"""
