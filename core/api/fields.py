"""Field types for request models: what both APIs accept as text and as numbers.

Whatever a model admits reaches SQLite and the JSON encoder, so it must fit both: integers in
64 bits, floats finite (``allow_inf_nan=False`` on the models), text encodable as UTF-8 (JSON
may carry lone surrogates such as ``"\\ud800"``) and, where it becomes a command line, an
environment or an identifier, free of NUL. Refused values name their field in the 422.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# Any text that is stored and shown (job output): valid Unicode, NUL allowed.
StoredText = Annotated[str, AfterValidator(_unicode)]
# Text that becomes part of a process (arguments, environment): no NUL either.
ProcessText = Annotated[str, AfterValidator(_unicode), AfterValidator(_no_nul)]
# Instance and launch ids: the characters cloud ids are made of.
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
# Secrets are printable ASCII; anything else is refused before a comparison is attempted.
Secret = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[!-~]+$")]
# Environment variable names: no '=' (it ends the name) and no NUL.
EnvName = Annotated[
    str, Field(min_length=1, max_length=256, pattern=r"^[^=\x00]+$"), AfterValidator(_unicode)
]
