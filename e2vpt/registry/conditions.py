"""Conditional requests of the registry (RFC 9110 section 13): a task's entity tag is its version.

Every response that carries a task version also carries `ETag: "<version>"` (versions of a task id are
never reused, not even after a delete, so a tag never names two contents). A write may be made
conditional, so that two people (or pipelines) updating one task cannot silently overwrite each other:

    If-Match: "4"         write only if the current version is still 4 (else 412, nothing written)
    If-Match: *           write only if the task exists
    If-None-Match: *      write only if the task does not exist (create, never overwrite)

and a read answers 304 Not Modified when `If-None-Match` names the version it would return. The
condition is checked inside the same Redis script that writes, so no other write can come between.
Imports nothing heavy: the HTTP client (`e2vpt tasks ...`) uses it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from e2vpt.errors import BadRequest, excerpt

ANY = "*"
# An If-Match / If-None-Match value: "*" or a list of entity tags (RFC 9110 8.8.3, visible ASCII only).
# One pattern for the parser and the OpenAPI schema (an ECMA regex too), so that they cannot disagree.
_TAG = r'(?:W/)?"[\x21\x23-\x7e]*"'
HEADER_PATTERN = rf"^[ \t]*(?:\*|{_TAG}(?:[ \t]*,[ \t]*{_TAG})*)[ \t]*$"
MAX_HEADER_CHARS = 1024  # bounds the list a Redis script checks
_HEADER = re.compile(HEADER_PATTERN)
_TAGS = re.compile(r'(W/)?"([\x21\x23-\x7e]*)"')


def etag(version: int) -> str:
    """The entity tag of a task version: `"4"`."""
    return f'"{int(version)}"'


def parse_tags(header: str | None, name: str, *, weak: bool) -> str | frozenset[int] | None:
    """An If-Match / If-None-Match header: None (absent), "*" or the versions it names.

    `weak`: weak comparison (If-None-Match): `W/"4"` names version 4; strong comparison (If-Match) never
    matches a weak tag (RFC 9110 8.8.3.2), so it names nothing. Tags that are not a version name nothing
    (they can never match). A header that is not `*` or a list of quoted tags is a `BadRequest`."""
    if header is None:
        return None
    if len(header) > MAX_HEADER_CHARS or _HEADER.fullmatch(header) is None:
        raise BadRequest(
            f'{name} must be * or a list of quoted entity tags such as "4" (at most {MAX_HEADER_CHARS} '
            f"characters), not {excerpt(header)}"
        )
    if header.strip() == ANY:
        return ANY
    return frozenset(
        int(value)
        for is_weak, value in _TAGS.findall(header)
        if value.isdigit() and len(value) <= 15 and (weak or not is_weak)
    )


def _lua(cond: str | frozenset[int] | None) -> str:
    if cond is None:
        return ""
    return ANY if cond == ANY else ",".join(str(v) for v in sorted(cond)) or "none"


@dataclass(frozen=True)
class Precondition:
    """The condition of a write on the task's current version: `if_match` must hold and `if_none_match`
    must not (each None, "*" or a set of versions, as `parse_tags` gives)."""

    if_match: str | frozenset[int] | None = None
    if_none_match: str | frozenset[int] | None = None

    @classmethod
    def version(cls, version: int) -> Precondition:
        """Only if the task's current version is `version`."""
        return cls(if_match=frozenset({int(version)}))

    @classmethod
    def absent(cls) -> Precondition:
        """Only if the task is not registered."""
        return cls(if_none_match=ANY)

    def headers(self) -> dict[str, str]:
        """The HTTP headers that state this condition (what the client sends)."""

        def tags(cond: str | frozenset[int]) -> str:
            return ANY if cond == ANY else ", ".join(etag(v) for v in sorted(cond))

        out = {"If-Match": self.if_match, "If-None-Match": self.if_none_match}
        return {name: tags(cond) for name, cond in out.items() if cond is not None}

    def lua_args(self) -> list[str]:
        """The two arguments of the store's scripts: "" (no condition), "*", "none" or "3,4"."""
        return [_lua(self.if_match), _lua(self.if_none_match)]

    def holds(self, current: int | None) -> bool:
        """The same test as the scripts' (`LUA_HOLDS`), for a read's If-None-Match."""

        def hit(cond: str | frozenset[int]) -> bool:
            return current is not None if cond == ANY else current in cond

        return (self.if_match is None or hit(self.if_match)) and (
            self.if_none_match is None or not hit(self.if_none_match)
        )


NO_CONDITION = Precondition()

# Lua twin of `Precondition.holds` (cur: the current version, 0 when the task is not registered).
LUA_HOLDS = """
local function hit(cond, cur)
  if cur == 0 then return false end
  if cond == '*' then return true end
  for v in string.gmatch(cond, '%d+') do
    if tonumber(v) == cur then return true end
  end
  return false
end
local function holds(if_match, if_none_match, cur)
  return (if_match == '' or hit(if_match, cur)) and (if_none_match == '' or not hit(if_none_match, cur))
end
"""
