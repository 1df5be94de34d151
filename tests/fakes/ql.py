"""The part of Overpass QL the fake understands, and the evaluation of a query against a World.

Grammar (https://wiki.openstreetmap.org/wiki/Overpass_API/Overpass_QL), a subset: settings ``[out:json]``,
``[timeout:N]``, ``[maxsize:N]``, ``[bbox:S,W,N,E]``; query statements ``node|way|relation|rel|nwr`` with tag filters
``["k"]``, ``[!"k"]``, ``["k"="v"]``, ``["k"!="v"]``, ``["k"~"re"(,i)]``, ``["k"!~"re"]`` and a bbox ``(S,W,N,E)``;
unions ``( ...; ...; );``; ``out`` with modifiers. Whitespace and comments are free, keys and values may be quoted
or bare. The World holds no tagged nodes, so node statements find nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .osm import OsmObject, Way, object_in_box, way_in_box
from .world import World

TYPES = {
    "node": ("node",),
    "way": ("way",),
    "relation": ("relation",),
    "rel": ("relation",),
    "nwr": ("node", "way", "relation"),
    "nw": ("node", "way"),
    "wr": ("way", "relation"),
    "nr": ("node", "relation"),
}
DEFAULT_TIMEOUT_S = 180
SPACE = re.compile(r"\s*")
BARE = re.compile(r"[A-Za-z0-9_:.\-]+")
NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*")


class QLError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: parse error: {message}")
        self.line = line


@dataclass(frozen=True)
class TagFilter:
    key: str
    op: str  # "has" | "not_has" | "=" | "!=" | "~" | "!~"
    value: str | None = None
    ignore_case: bool = False

    def matches(self, tags) -> bool:
        value = tags.get(self.key)
        if self.op == "has":
            return value is not None
        if self.op == "not_has":
            return value is None
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        found = value is not None and re.search(self.value, value, re.IGNORECASE if self.ignore_case else 0)
        return bool(found) if self.op == "~" else not found


@dataclass(frozen=True)
class Statement:
    types: tuple[str, ...]
    filters: tuple[TagFilter, ...]
    bbox: tuple[float, float, float, float] | None  # west, south, east, north


@dataclass
class Query:
    settings: dict[str, str]
    program: list  # Statement | list[Statement] (a union) | ("out", modifiers)

    @property
    def timeout_s(self) -> int:
        return int(self.settings.get("timeout", DEFAULT_TIMEOUT_S))

    def maxsize(self, default: int) -> int:
        return int(self.settings.get("maxsize", default))


class _Parser:
    def __init__(self, text: str):
        self.text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
        self.text = re.sub(r"(?m)(^|\s)//[^\n]*", r"\1", self.text)
        self.pos = 0

    def fail(self, message: str):
        raise QLError(self.text.count("\n", 0, self.pos) + 1, message)

    def skip(self) -> None:
        self.pos = SPACE.match(self.text, self.pos).end()

    def peek(self, token: str) -> bool:
        self.skip()
        return self.text.startswith(token, self.pos)

    def expect(self, token: str) -> None:
        if not self.peek(token):
            self.fail(f"'{token}' expected, found '{self.text[self.pos : self.pos + 12]}'")
        self.pos += len(token)

    def word(self) -> str:
        self.skip()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            quote, end = self.text[self.pos], self.pos + 1
            while end < len(self.text) and self.text[end] != quote:
                end += 2 if self.text[end] == "\\" else 1
            if end >= len(self.text):
                self.fail("unterminated string")
            raw, self.pos = self.text[self.pos + 1 : end], end + 1
            return re.sub(r"\\(.)", r"\1", raw)
        match = BARE.match(self.text, self.pos)
        if not match:
            self.fail(f"a name or string expected, found '{self.text[self.pos : self.pos + 12]}'")
        self.pos = match.end()
        return match.group()

    def numbers(self, count: int) -> list[float]:
        values = []
        for i in range(count):
            match = NUMBER.match(self.text, self.pos)
            if not match:
                self.fail("a number expected in the bounding box")
            values.append(float(match.group(1)))
            self.pos = match.end()
            if i < count - 1:
                self.expect(",")
        return values

    def parse(self) -> Query:
        settings: dict[str, str] = {}
        if self.peek("["):
            while self.peek("["):
                self.expect("[")
                self.skip()
                match = re.compile(r"(\w+)\s*:").match(self.text, self.pos)
                if not match:
                    self.fail("a setting [name:value] expected")
                name, self.pos = match.group(1), match.end()
                end = self.text.find("]", self.pos)
                if end < 0:
                    self.fail("']' expected")
                settings[name], self.pos = self.text[self.pos : end].strip(), end + 1
            self.expect(";")
        for name, value in settings.items():
            if name not in ("out", "timeout", "maxsize", "bbox"):
                self.fail(f"unsupported setting '{name}'")
            if name in ("timeout", "maxsize") and not value.isdigit():
                self.fail(f"{name} must be a positive integer")
        program = []
        while not self.peek_end():
            program.append(self.statement())
        return Query(settings, program)

    def peek_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)

    def statement(self):
        if self.peek("("):
            self.expect("(")
            members = []
            while not self.peek(")"):
                if self.peek_end():
                    self.fail("')' expected")
                members.append(self.statement())
            self.expect(")")
            self.expect(";")
            return members
        name = self.word()
        if name == "out":
            modifiers = []
            while not self.peek(";"):
                modifiers.append(self.word())
            self.expect(";")
            return ("out", tuple(modifiers))
        if name not in TYPES:
            self.fail(f'Unknown type "{name}"')
        filters = []
        while self.peek("["):
            filters.append(self.tag_filter())
        bbox = None
        if self.peek("("):
            self.expect("(")
            south, west, north, east = self.numbers(4)
            self.expect(")")
            if not (-90 <= south <= north <= 90 and -180 <= west <= 180 and -180 <= east <= 180):
                self.fail("the bbox must be (south,west,north,east) with south <= north")
            bbox = (west, south, east, north)
        self.expect(";")
        return Statement(TYPES[name], tuple(filters), bbox)

    def tag_filter(self) -> TagFilter:
        self.expect("[")
        negated = self.peek("!")
        if negated:
            self.expect("!")
        key = self.word()
        if self.peek("]"):
            self.expect("]")
            return TagFilter(key, "not_has" if negated else "has")
        if negated:
            self.fail("'!' only negates a key: [!\"key\"]")
        for op in ("!=", "!~", "=", "~"):
            if self.peek(op):
                self.expect(op)
                break
        else:
            self.fail("'=', '!=', '~' or '!~' expected in a tag filter")
        value = self.word()
        ignore_case = False
        if op in ("~", "!~") and self.peek(","):
            self.expect(",")
            ignore_case = self.word() == "i"
        self.expect("]")
        return TagFilter(key, op, value, ignore_case)


def parse(text: str) -> Query:
    return _Parser(text).parse()


def _select(statement: Statement, world: World, default_bbox) -> dict:
    bbox = statement.bbox or default_bbox
    found: dict[tuple[str, int], OsmObject | Way] = {}
    for obj in world.candidates(bbox):  # raises AreaTooLarge for huge boxes, like Overpass running out of memory
        if "relation" in statement.types and obj.type == "relation" and object_in_box(obj, bbox):
            if all(f.matches(obj.tags) for f in statement.filters):
                found[("relation", obj.id)] = obj
        if "way" in statement.types:
            for way in obj.ways():
                if all(f.matches(way.tags) for f in statement.filters) and way_in_box(way, bbox):
                    found[("way", way.id)] = way
    return found


def evaluate(query: Query, world: World) -> list[list]:
    """The sets printed by each ``out`` statement, each ordered as Overpass orders them (type, then id)."""
    default_bbox = None
    if "bbox" in query.settings:
        south, west, north, east = (float(v) for v in query.settings["bbox"].split(","))
        default_bbox = (west, south, east, north)
    current: dict = {}
    printed = []

    def run(statement):
        if isinstance(statement, list):
            union: dict = {}
            for member in statement:
                union.update(run(member))
            return union
        return _select(statement, world, statement.bbox or default_bbox or (-180.0, -90.0, 180.0, 90.0))

    for statement in query.program:
        if isinstance(statement, tuple):
            printed.append([current[k] for k in sorted(current, key=lambda k: (k[0] != "way", k[1]))])
        else:
            current = run(statement)
    return printed


def _bounds(coords) -> dict:
    lons, lats = [c[0] for c in coords], [c[1] for c in coords]
    return {"minlat": min(lats), "minlon": min(lons), "maxlat": max(lats), "maxlon": max(lons)}


def element_json(item: OsmObject | Way) -> str:
    """``element(item)`` serialized (cached: the same object always prints the same)."""
    if isinstance(item, Way):
        if item.json is None:
            item.json = json.dumps(element(item), separators=(",", ":"))
        return item.json
    cached = item._cache.get("json")
    if cached is None:
        cached = item._cache["json"] = json.dumps(element(item), separators=(",", ":"))
    return cached


def element(item: OsmObject | Way) -> dict:
    """The ``out geom`` JSON element of a way or a relation (a new dict each time)."""
    if isinstance(item, Way):
        el = {
            "type": "way",
            "id": item.id,
            "bounds": _bounds(item.coords),
            "nodes": list(item.nodes),
            "geometry": [{"lat": lat, "lon": lon} for lon, lat in item.coords],
        }
        if item.tags:
            el["tags"] = dict(item.tags)
        return el
    members = [
        {
            "type": "way",
            "ref": m.way.id,
            "role": m.role,
            "geometry": [{"lat": lat, "lon": lon} for lon, lat in m.way.coords],
        }
        for m in item.members
    ]
    coords = [c for m in item.members for c in m.way.coords]
    return {"type": "relation", "id": item.id, "bounds": _bounds(coords), "members": members, "tags": dict(item.tags)}
