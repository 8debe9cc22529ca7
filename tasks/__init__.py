"""The pipeline's units of work: plain functions per stage (wrapped as Prefect tasks in
tasks/jobs.py)."""

import os

# Prefect's ephemeral server (used when PREFECT_API_URL is unset) gets 20 s to start and SQLite
# 5-10 s per lock by default: too little on a busy 2-core machine. Users' own settings win.
for _key, _value in (("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
                     ("PREFECT_SERVER_DATABASE_TIMEOUT", "60"),
                     ("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "30")):
    os.environ.setdefault(_key, _value)
