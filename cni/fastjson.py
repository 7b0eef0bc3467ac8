"""JSON for the thin plugin without importing `json` (which pulls in re, enum, functools, collections: ~9 ms of
a ~25 ms plugin start). Uses CPython's own C accelerator `_json` exactly as `json` does; falls back to `json`
where `_json` is missing. Only what the plugin needs: loads() of an object document, dumps() compact.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - other Python implementations
    _json = None  # type: ignore[assignment]


class _DecodeContext:
    """The attributes `_json.make_scanner` reads (the same defaults as json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # "NaN", "Infinity", "-Infinity" -> float, as json does
    memo: dict[str, str] = {}


_WS = " \t\n\r"


def loads(data: str | bytes) -> Any:
    """Like json.loads (raises ValueError on bad input)."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if _json is None:  # pragma: no cover
        import json

        return json.loads(text)
    text = text.strip(_WS)
    scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]  # duck-typed context
    try:
        obj, end = scan(text, 0)
        if end == len(text):
            return obj
    except (StopIteration, ValueError, SystemError):
        # _json reports some errors through json.decoder, which it only finds if already imported (SystemError
        # otherwise): on the error path, let json itself produce the precise JSONDecodeError.
        pass
    import json

    return json.loads(text)


def _default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: object) -> str:
    """Like json.dumps(obj, separators=(",", ":")) for plain dicts/lists/str/int/float/bool/None."""
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj, separators=(",", ":"))
    encoder = _json.make_encoder(
        {}, _default, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return "".join(encoder(obj, 0))
