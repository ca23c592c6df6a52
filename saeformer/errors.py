"""The one exception type that the CLI turns into a single clear line on stderr."""


class UserError(Exception):
    """Bad input from the user (config, corpus, checkpoint, path): printed as one line, exit 2."""
