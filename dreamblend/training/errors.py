"""The error for problems fixed by changing inputs or settings (the CLI prints it without a traceback)."""


class TrainingInputError(ValueError):
    """A problem with the user's inputs or settings; the message says how to fix it."""
