"""Turn pydantic validation failures into Realtime `error` details with an exact `param` path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .events import ErrorDetail

_CODE_BY_PYDANTIC_TYPE = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "literal_error": "invalid_value",
    "enum": "invalid_value",
    "union_tag_invalid": "invalid_value",
    "union_tag_not_found": "missing_required_parameter",
    "greater_than": "value_below_min",
    "greater_than_equal": "value_below_min",
    "less_than": "value_above_max",
    "less_than_equal": "value_above_max",
    "too_short": "invalid_value",
    "too_long": "invalid_value",
    "string_too_long": "string_above_max_length",
    "string_too_short": "string_below_min_length",
    "string_pattern_mismatch": "invalid_value",
    "value_error": "invalid_value",
}


class ProtocolError(Exception):
    """A client mistake, reported as an `error` event; the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def detail(self, event_id: str | None) -> ErrorDetail:
        return ErrorDetail(type=self.type, code=self.code, message=self.message, param=self.param,
                           event_id=event_id)


def wire_path(loc: tuple[Any, ...], data: Any) -> str:
    """The error location as the client wrote it: union tags and validator names dropped.

    Pydantic inserts discriminator tags (e.g. ``server_vad``) into locations; walking the input
    alongside the location keeps only the steps that exist in what the client sent.
    """
    parts: list[str] = []
    node = data
    for step in loc:
        if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
            parts[-1:] = [f"{parts[-1]}[{step}]"] if parts else [f"[{step}]"]
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict) and step in node:
            parts.append(step)
            node = node[step]
        elif isinstance(step, str) and step.isidentifier() and step not in _UNION_TAGS \
                and not step[0].isupper():
            # A missing field: still part of the path the client should have sent. (Capitalised
            # steps are pydantic's names for union members, never wire fields.)
            parts.append(step)
            node = None
    return ".".join(parts)


# Names pydantic uses for union members; never part of a wire path.
_UNION_TAGS = {"server_vad", "semantic_vad", "function", "mcp", "input_text", "input_image", "input_file",
              "str", "int", "dict", "list", "bool", "float", "none"}


def _is_member_mismatch(err: Any) -> bool:
    kind = err.get("type", "")
    return kind in ("literal_error", "model_attributes_type", "model_type", "dict_type", "union_tag_invalid") \
        or kind.endswith(("_parsing", "_type"))


def from_validation_error(exc: ValidationError, data: Any, prefix: str = "") -> ProtocolError:
    """Report the first validation failure, with the client-visible parameter path.

    For a union field (e.g. ``max_output_tokens: int | "inf"``) pydantic reports one error per
    member; the useful one is a member that matched the input's kind but failed a constraint.
    """
    errors = exc.errors(include_url=False)
    err = errors[0]
    path = wire_path(tuple(err.get("loc", ())), data)
    siblings = [e for e in errors if wire_path(tuple(e.get("loc", ())), data).startswith(path)]
    union_msg = None
    if len(siblings) > 1:
        specific = [e for e in siblings if not _is_member_mismatch(e)]
        if specific:
            err = specific[0]
            path = wire_path(tuple(err.get("loc", ())), data)
        else:
            union_msg = " or ".join(dict.fromkeys(e.get("msg", "") for e in siblings))
    kind = err.get("type", "value_error")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # A discriminated union rejects its tag: the field at fault is the discriminator.
        discriminator = str((err.get("ctx") or {}).get("discriminator", "'type'")).strip("'")
        path = f"{path}.{discriminator}" if path else discriminator
    param = ".".join(p for p in (prefix, path) if p) or None
    code = _CODE_BY_PYDANTIC_TYPE.get(kind, "invalid_type" if kind.endswith("_type") or "parsing" in kind
                                      else "invalid_value")
    msg = err.get("msg", "Invalid value")
    if union_msg:
        code, msg = "invalid_value", f"Invalid value for '{param}': {union_msg}."
    elif kind == "extra_forbidden":
        msg = f"Unknown parameter: '{param}'."
    elif kind in ("missing", "union_tag_not_found"):
        msg = f"Missing required parameter: '{param}'."
    else:
        msg = f"Invalid value for '{param}': {msg}." if param else f"{msg}."
    return ProtocolError(msg, code=code, param=param)
