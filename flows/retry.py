"""The retry rule every Prefect task of the pipeline shares: transient failures (a killed worker,
a flaky S3) are retried, bad input (exit status 2, AbairError) never is."""

from __future__ import annotations

from tasks.core.errors import AbairError

# Exit status of `abair` for bad input: retrying cannot help.
BAD_INPUT = 2


class JobFailed(RuntimeError):
    def __init__(self, name: str, returncode: int):
        self.returncode = returncode
        super().__init__(f"job {name} exited with status {returncode}")


def retry_unless_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except JobFailed as exc:
        return exc.returncode != BAD_INPUT
    except AbairError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False
