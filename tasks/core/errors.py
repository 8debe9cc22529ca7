"""The one error type users see: a single line naming the file (or URI) and what is wrong with it."""


class AbairError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with status 2."""

    def __init__(self, where: str, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
