"""Errors the engine raises for bad user input."""


class InputError(ValueError):
    """A bad input from the user (file, label, case id, workspace).

    The message is one line that names the file or value at fault and what is wrong;
    the CLI prints it without a traceback and exits non-zero, the Slicer Logic lets it
    reach ``tryWithErrorDisplay``. Raised before anything on disk is changed.
    """
