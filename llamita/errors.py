"""llamita's one exception type: the CLI prints its message and exits with status 2."""


class LlamitaError(Exception):
    """Bad input a user can fix: the message names the file (or field) and the problem."""
