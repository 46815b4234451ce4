"""An independent answer checker for bAbI stories: it reads only the text and re-derives every answer.

It shares no code or state with the generator (lm2cli.data.stories): it parses each statement with a
regular expression and keeps its own reader-side model of the world. The generator calls it on every story it
emits, and a test runs it over the real bAbI files (when present) to check the checker itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lm2cli.data.babi import Story

_MOVE = re.compile(r"^(\w+) (?:moved|went back|went|journeyed|travelled) to the (\w+)\.$")
_GET = re.compile(r"^(\w+) (?:got|took|grabbed|picked up) the (\w+)(?: there)?\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|left|discarded|put down) the (\w+)(?: there)?\.$")
_GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
_IS_IN = re.compile(r"^(\w+) is in the (\w+)\.$")
_NOT_IN = re.compile(r"^(\w+) is (?:not|no longer) in the (\w+)\.$")
_EITHER = re.compile(r"^(\w+) is either in the (\w+) or the (\w+)\.$")
_RELATION = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
STATEMENTS = (_MOVE, _GET, _DROP, _GIVE, _IS_IN, _NOT_IN, _EITHER, _RELATION)
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_COUNT = ["none", "one", "two", "three", "four", "five"]


def is_statement(text: str) -> bool:
    """Whether `text` is one bAbI statement of a form this checker reads (e.g. "Mary went to the kitchen.")."""
    return any(pattern.match(text) for pattern in STATEMENTS)


@dataclass
class _Reader:
    """What a reader of the story so far knows."""

    place: dict[str, str] = field(default_factory=dict)  # person -> room they are known to be in
    belief: dict[str, tuple] = field(default_factory=dict)  # person -> ("at"|"not"|"either", rooms)
    carrying: dict[str, list[str]] = field(default_factory=dict)  # person -> objects, acquisition order
    carrier: dict[str, str] = field(default_factory=dict)  # object -> person holding it
    where: dict[str, str] = field(default_factory=dict)  # object -> known room
    trail: dict[str, list[str]] = field(default_factory=dict)  # object -> rooms it went through (collapsed)
    gives: list[tuple[str, str, str]] = field(default_factory=list)  # (giver, object, recipient)
    relations: set = field(default_factory=set)  # (x, direction, y): x is direction of y

    def _object_at(self, obj: str, room: str) -> None:
        self.where[obj] = room
        trail = self.trail.setdefault(obj, [])
        if not trail or trail[-1] != room:
            trail.append(room)

    def read(self, text: str) -> None:
        if m := _MOVE.match(text):
            person, room = m.groups()
            if self.place.get(person) == room:
                raise AssertionError(f"'{text}': a move to the room the person is already in")
            self._be(person, room)
        elif m := _IS_IN.match(text):
            self._be(*m.groups())
        elif m := _NOT_IN.match(text):
            person, room = m.groups()
            self.place.pop(person, None)
            self.belief[person] = ("not", (room,))
        elif m := _EITHER.match(text):
            person, a, b = m.groups()
            self.place.pop(person, None)
            self.belief[person] = ("either", (a, b))
        elif m := _GET.match(text):
            person, obj = m.groups()
            self.carrier[obj] = person
            self.carrying.setdefault(person, []).append(obj)
            if person in self.place:
                self._object_at(obj, self.place[person])
        elif m := _DROP.match(text):
            person, obj = m.groups()
            self.carrier.pop(obj, None)
            self.carrying[person].remove(obj)
        elif m := _GIVE.match(text):
            giver, obj, recipient = m.groups()
            self.carrying[giver].remove(obj)
            self.carrying.setdefault(recipient, []).append(obj)
            self.carrier[obj] = recipient
            self.gives.append((giver, obj, recipient))
        elif m := _RELATION.match(text):
            x, direction, y = m.groups()
            self.relations.add((x, direction, y))
            self.relations.add((y, _OPPOSITE[direction], x))
        else:
            raise AssertionError(f"unrecognised statement: '{text}'")

    def _be(self, person: str, room: str) -> None:
        self.place[person] = room
        self.belief[person] = ("at", (room,))
        for obj, holder in self.carrier.items():
            if holder == person:
                self._object_at(obj, room)

    # ----------------------------------------------------------------------------------------- answers

    def answer(self, question: str) -> str | None:
        q = question.strip()
        patterns = [
            (r"^Where is the (\w+)\?$", self._where_object),
            (r"^Where is (\w+)\?$", lambda p: self.place.get(p)),
            (r"^Where was the (\w+) before the (\w+)\?$", self._before),
            (r"^What is (north|south|east|west) of the (\w+)\?$",
             lambda d, y: self._related(lambda r: r[1] == d and r[2] == y, 0)),
            (r"^What is the (\w+) (north|south|east|west) of\?$",
             lambda x, d: self._related(lambda r: r[0] == x and r[1] == d, 2)),
            (r"^What did (\w+) give to (\w+)\?$", lambda a, b: self._give(lambda g: g[0] == a and g[2] == b, 1)),
            (r"^Who gave the (\w+)\?$", lambda o: self._give(lambda g: g[1] == o, 0)),
            (r"^Who gave the (\w+) to (\w+)\?$", lambda o, b: self._give(lambda g: g[1] == o and g[2] == b, 0)),
            (r"^Who received the (\w+)\?$", lambda o: self._give(lambda g: g[1] == o, 2)),
            (r"^Who did (\w+) give the (\w+) to\?$", lambda a, o: self._give(lambda g: g[0] == a and g[1] == o, 2)),
            (r"^Is (\w+) in the (\w+)\?$", self._is_in),
            (r"^How many objects is (\w+) carrying\?$", lambda p: _COUNT[len(self.carrying.get(p, []))]),
            (r"^What is (\w+) carrying\?$", lambda p: ",".join(self.carrying.get(p, [])) or "nothing"),
        ]
        for pattern, rule in patterns:
            if m := re.match(pattern, q):
                return rule(*m.groups())
        raise AssertionError(f"unrecognised question: '{q}'")

    def _where_object(self, obj: str) -> str | None:
        holder = self.carrier.get(obj)
        if holder is not None:
            return self.place.get(holder)
        return self.where.get(obj)

    def _before(self, obj: str, room: str) -> str | None:
        trail = self.trail.get(obj, [])
        for j in range(len(trail) - 1, 0, -1):
            if trail[j] == room:
                return trail[j - 1]
        return None

    def _related(self, match, slot: int) -> str | None:
        found = {r[slot] for r in self.relations if match(r)}
        return found.pop() if len(found) == 1 else None

    def _give(self, match, slot: int) -> str | None:
        for g in reversed(self.gives):
            if match(g):
                return g[slot]
        return None

    def _is_in(self, person: str, room: str) -> str | None:
        if person not in self.belief:
            return None
        kind, rooms = self.belief[person]
        if kind == "at":
            return "yes" if room == rooms[0] else "no"
        if kind == "not":
            return "no" if room == rooms[0] else None  # elsewhere: unknowable
        return "maybe" if room in rooms else "no"


def story_answers(story: Story) -> list[tuple[str, str | None]]:
    """(answer in the story, answer the checker derives) for every question of a story."""
    reader = _Reader()
    out = []
    for ln in story.lines:
        if ln.is_question:
            out.append((ln.answer, reader.answer(ln.text)))
        else:
            reader.read(ln.text)
    return out


def check_story(story: Story) -> None:
    """Raise AssertionError unless every answer, support set and move of the story is consistent."""
    for (given, derived), ln in zip(story_answers(story), [x for x in story.lines if x.is_question], strict=True):
        if given != derived:
            raise AssertionError(f"{story.task}: '{ln.text}' answered '{given}', the checker says '{derived}'")
    n_statements = 0
    index: dict[int, int] = {}
    for line_id, ln in enumerate(story.lines, 1):
        if not ln.is_question:
            index[line_id] = n_statements
            n_statements += 1
            continue
        if not ln.support or any(s not in index for s in ln.support):
            raise AssertionError(f"{story.task}: '{ln.text}' has support {ln.support} that is not a statement")
        age = n_statements - 1 - max(index[s] for s in ln.support)
        if age > 4:
            raise AssertionError(f"{story.task}: '{ln.text}' newest support is {age} statements back (max 4)")
