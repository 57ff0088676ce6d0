"""What a bad command line is, at the bottom of tpmoe.cli: the argument checks
(tpmoe.cli.arguments) raise it, and so do the commands' own early checks (the bench's fit, the
plot's matplotlib), which the arguments module imports; `tpmoe.cli.main` prints it."""

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2. Only for what the user typed: an
    error inside a command is not one (it is a traceback, or a rank's failure)."""
