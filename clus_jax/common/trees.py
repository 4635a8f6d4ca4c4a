"""Helpers on parameter trees shared by every layer."""
from __future__ import annotations


def path_str(path: tuple) -> str:
    """A tree path (dict keys, attributes, indices) as 'a/b/0', the form the parameter-group patterns match."""
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(str(key))
    return "/".join(parts)
