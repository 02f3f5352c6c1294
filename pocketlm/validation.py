"""One-line messages for pydantic validation errors in user files (recipes, task files)."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


def validation_message(exc: ValidationError, root: type[BaseModel]) -> str:
    """The first error as 'key: what is wrong (what was expected)'."""
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _section_model(root, loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        typo = loc[-1]
        close = [k for k in allowed if typo.startswith(k) or k.startswith(typo)] or difflib.get_close_matches(typo, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key{hint} (expected one of: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{key}: missing (required)"
    if error["type"] == "value_error":  # a validator's own sentence: without pydantic's prefix or a whole section
        message = error["msg"].removeprefix("Value error, ")
        prefix = "" if not loc or message.startswith(loc[0]) else f"{key}: "
        got = "" if isinstance(error.get("input"), dict) else f" (got {error.get('input')!r})"
        return f"{prefix}{message}{got}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _section_model(root: type[BaseModel], loc: list[str]):
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model
