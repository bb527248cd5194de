"""Recorded monkey-patching: every change to LMDeploy goes through a Patcher,
so all of them can be undone at once when a later check finds that the
installed LMDeploy is not the one these hooks were written for."""
from __future__ import annotations

from typing import Any

_MISSING = object()
_CALL = object()  # an undo entry that is a function to call


class Patcher:
    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> Any:
        """Sets obj.name = value; returns the previous value (None if absent)."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        self._undo.append((obj, name, old))
        setattr(obj, name, value)
        return None if old is _MISSING else old

    def setitem(self, mapping: dict, key: Any, value: Any) -> None:
        self._undo.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    def call_on_revert(self, fn: Any) -> None:
        """Calls fn() when reverting, after undoing what was recorded after it
        (a pydantic model rebuilt once its fields are restored)."""
        self._undo.append((fn, "", _CALL))

    def revert(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _CALL:
                obj()
            elif isinstance(obj, dict):
                if old is _MISSING:
                    obj.pop(name, None)
                else:
                    obj[name] = old
            elif old is _MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)

    def __len__(self) -> int:
        return len(self._undo)
