"""The one user-facing error class.

Library code raises `AftError` for anything the user can fix (bad input file,
unknown model, bad config key). The CLI turns it into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""


class AftError(Exception):
    """A problem with the user's input, config or environment, stated in one line."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format a location prefix: 'file.jsonl:12: field "query": '."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f': field "{field}"'
    return loc + ": "
