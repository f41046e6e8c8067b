"""Consul's ``?filter=`` expression language (hashicorp/go-bexpr) over JSON-shaped values (pure).

Supported forms, as Consul documents them::

    <Selector> == <Value>            <Selector> != <Value>
    <Selector> is empty              <Selector> is not empty
    <Value> in <Selector>            <Value> not in <Selector>
    <Selector> contains <Value>      <Selector> not contains <Value>
    <Selector> matches <Value>       <Selector> not matches <Value>
    <Expr> and <Expr>    <Expr> or <Expr>    not <Expr>    ( <Expr> )

Selectors are dotted field paths (``Service.Meta.version``, ``Service.Tags``, ``Checks.Status``);
a map key may also be written ``Service.Meta["my-key"]``. A path through a list (``Checks.Status``)
matches when any element matches. Values are quoted strings (``"x"`` or backquoted), numbers, or
bare words (``Service.Tags contains v1``). A value compared with a number or boolean field is
converted to that type. ``compile`` raises ``FilterError`` for an expression that does not parse;
Consul answers such a filter with 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Predicate = Callable[[Any], bool]


class FilterError(ValueError):
    """The expression does not parse; the message says where."""


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<eq>==)
  | (?P<ne>!=)
  | (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<idx>\[\s*(?:"(?:[^"\\]|\\.)*"|`[^`]*`)\s*\])
  | (?P<word>[A-Za-z0-9_\-.:/@+*]+(?:\.[A-Za-z0-9_\-]+)*)
""", re.VERBOSE)

_KEYWORDS = {"and", "or", "not", "in", "is", "empty", "contains", "matches"}


@dataclass
class _Tok:
    kind: str  # lp rp eq ne str word idx end
    text: str
    pos: int


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    out = []
    i = 1
    while i < len(text) - 1:
        c = text[i]
        if c == "\\" and i + 1 < len(text) - 1:
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _tokenize(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise FilterError(f"1:{pos + 1} ({pos}): no match found, unexpected {expr[pos]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("end", "", len(expr)))
    return toks


@dataclass(frozen=True)
class _Selector:
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


_MISSING = object()


def _field(obj: Any, name: str) -> Any:
    if not isinstance(obj, Mapping):
        return _MISSING
    if name in obj:
        return obj[name]
    low = name.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return _MISSING


def _resolve(obj: Any, parts: tuple[str, ...]) -> list[Any]:
    """Every value the selector reaches (several when the path goes through a list)."""
    if not parts:
        return [obj]
    if isinstance(obj, list):
        out: list[Any] = []
        for item in obj:
            out.extend(_resolve(item, parts))
        return out
    value = _field(obj, parts[0])
    if value is _MISSING:
        return []
    return _resolve(value, parts[1:])


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def _equal(field: Any, value: str) -> bool:
    if isinstance(field, bool):
        low = value.lower()
        if low in ("true", "1", "t"):
            return field is True
        if low in ("false", "0", "f"):
            return field is False
        return False
    if isinstance(field, (int, float)):
        try:
            return float(value) == float(field)
        except ValueError:
            return False
    if field is None:
        return value == ""
    if isinstance(field, (list, dict)):
        return False
    return str(field) == value


def _contains(field: Any, value: str) -> bool:
    if isinstance(field, list):
        return any(_equal(x, value) for x in field)
    if isinstance(field, Mapping):
        return value in field
    if isinstance(field, str):
        return value in field
    return False


def _or(a: Predicate, b: Predicate) -> Predicate:
    return lambda o: a(o) or b(o)


def _and(a: Predicate, b: Predicate) -> Predicate:
    return lambda o: a(o) and b(o)


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = _tokenize(expr)
        self.i = 0

    def peek(self, offset: int = 0) -> _Tok:
        return self.toks[min(self.i + offset, len(self.toks) - 1)]

    def kw(self, word: str, offset: int = 0) -> bool:
        t = self.peek(offset)
        return t.kind == "word" and t.text == word

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, what: str) -> FilterError:
        t = self.peek()
        got = repr(t.text) if t.kind != "end" else "end of input"
        return FilterError(f"1:{t.pos + 1} ({t.pos}): no match found, expected {what}, got {got}")

    def parse(self) -> Predicate:
        if self.peek().kind == "end":
            raise self.fail("an expression")
        pred = self.or_()
        if self.peek().kind != "end":
            raise self.fail("\"and\", \"or\" or end of input")
        return pred

    def or_(self) -> Predicate:
        left = self.and_()
        while self.kw("or"):
            self.take()
            right = self.and_()
            left = _or(left, right)
        return left

    def and_(self) -> Predicate:
        left = self.not_()
        while self.kw("and"):
            self.take()
            right = self.not_()
            left = _and(left, right)
        return left

    def not_(self) -> Predicate:
        # "not" starts a negation unless it is the start of "not in"/"not contains" after a value
        if self.kw("not") and not (self.kw("in", 1) or self.kw("contains", 1) or self.kw("matches", 1)):
            self.take()
            inner = self.not_()
            return lambda o: not inner(o)
        return self.primary()

    def primary(self) -> Predicate:
        t = self.peek()
        if t.kind == "lp":
            self.take()
            inner = self.or_()
            if self.peek().kind != "rp":
                raise self.fail("\")\"")
            self.take()
            return inner
        if t.kind in ("str", "word") and (self.kw("in", 1) or (self.kw("not", 1) and self.kw("in", 2))):
            value = self.value()
            negate = False
            if self.kw("not"):
                self.take()
                negate = True
            self.take()  # in
            sel = self.selector()
            return self._in(sel, value, negate)
        sel = self.selector()
        if self.kw("is"):
            self.take()
            negate = False
            if self.kw("not"):
                self.take()
                negate = True
            if not self.kw("empty"):
                raise self.fail("\"empty\"")
            self.take()
            parts = sel.parts

            def empty(o: Any) -> bool:
                return all(_empty(v) for v in _resolve(o, parts)) != negate
            return empty
        tok = self.peek()
        if tok.kind in ("eq", "ne"):
            self.take()
            value = self.value()
            parts = sel.parts
            want = tok.kind == "eq"

            def eq(o: Any) -> bool:
                return any(_equal(f, value) for f in _resolve(o, parts)) == want
            return eq
        negate = False
        if self.kw("not"):
            self.take()
            negate = True
        if self.kw("contains"):
            self.take()
            return self._in(sel, self.value(), negate)
        if self.kw("matches"):
            self.take()
            pattern = self.value()
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise FilterError(f"Failed to compile regular expression {pattern!r}: {exc}") from None
            parts = sel.parts

            def matches(o: Any) -> bool:
                return any(isinstance(f, str) and rx.search(f) is not None for f in _resolve(o, parts)) != negate
            return matches
        raise self.fail("\"==\", \"!=\", \"is\", \"contains\", \"matches\", \"not\" or \"in\"")

    def _in(self, sel: _Selector, value: str, negate: bool) -> Predicate:
        def pred(o: Any) -> bool:
            hit = any(_contains(f, value) for f in _resolve(o, sel.parts))
            return hit != negate
        return pred

    def selector(self) -> _Selector:
        t = self.peek()
        if t.kind != "word" or t.text in _KEYWORDS or not re.match(r"[A-Za-z_]", t.text):
            raise self.fail("a selector")
        self.take()
        parts = [p for p in t.text.split(".")]
        if any(not p for p in parts):
            raise FilterError(f"1:{t.pos + 1} ({t.pos}): invalid selector {t.text!r}")
        while self.peek().kind == "idx":
            raw = self.take().text.strip()[1:-1].strip()
            parts.append(_unquote(raw))
            if self.peek().kind == "word" and self.peek().text.startswith("."):
                more = self.take().text[1:]
                parts.extend(more.split("."))
        return _Selector(tuple(parts))

    def value(self) -> str:
        t = self.peek()
        if t.kind == "str":
            self.take()
            return _unquote(t.text)
        if t.kind == "word" and t.text not in ("and", "or"):
            self.take()
            return t.text
        raise self.fail("a value")


def compile(expr: str) -> Predicate:
    """Compile a filter expression into a predicate over a JSON-shaped value."""
    return _Parser(expr).parse()


def check(expr: str) -> Predicate | None:
    """None for an empty expression (no filtering), else the compiled predicate."""
    if not expr:
        return None
    return compile(expr)
