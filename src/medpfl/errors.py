"""Errors meant for users: one clear sentence naming the file or option and what to do."""


class MedPFLError(Exception):
    """A problem with the user's input; the CLI prints its message without a traceback."""
