"""The one wording of a conversion refusal's clause: the field, its value, what is supported."""
from __future__ import annotations


def unsupported(field: str, value, supported: str) -> str:
    """``field=value (supported: ...)``: one clause of a ConversionError, which joins several with '; '."""
    return f"{field}={value!r} (supported: {supported})"
