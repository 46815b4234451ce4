"""A deterministic bAbI-style story generator for tasks qa1-qa10 (rules: docs/data.md, babilong.md §2).

Each story keeps two layers of state:

* the hidden world (where everybody and everything really is), which decides which actions are legal;
* reader knowledge (what the text so far lets a reader infer), which decides answers. A question is only
  asked when reader knowledge determines its answer and its newest supporting fact is at most 4 statements
  back.

Stories are written in pairs of statements; after each pair one question may be asked, and a story ends with
its 5th question (qa4: 2 statements, 1 question). Story i of (task, split, seed) is generated from its own
random stream, so a set is reproducible and growing it never changes its beginning.

Train and test are disjoint by construction: a hash of the story text puts every possible story on exactly
one side (1 in TEST_SHARE on the test side) and each stream skips the other side's stories.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from lm2cli.data.babi import Line, Story

# Bump when the same (task, split, seed, index) would produce a different story.
GENERATOR_VERSION = 1

ROOMS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
PLACES = ["bedroom", "cinema", "kitchen", "office", "park", "school"]  # qa10
OBJECTS = ["apple", "football", "milk"]
ACTORS = ["Mary", "John", "Daniel", "Sandra"]
ACTORS_QA5 = ["Bill", "Fred", "Jeff", "Mary"]
ACTORS_QA10 = ["Bill", "Fred", "Julie", "Mary"]

MOVE_VERBS = ["moved", "went", "journeyed", "travelled", "went back"]
GET_VERBS = ["got", "took", "grabbed", "picked up"]
DROP_VERBS = ["dropped", "left", "discarded", "put down"]
GIVE_VERBS = ["gave", "handed", "passed"]
NUMBER_WORDS = ["none", "one", "two", "three"]

LABELS = {
    **{t: ROOMS for t in ("qa1", "qa2", "qa3", "qa4")},
    "qa5": ACTORS_QA5 + OBJECTS, "qa6": ["no", "yes"], "qa7": NUMBER_WORDS, "qa8": OBJECTS + ["nothing"],
    "qa9": ["no", "yes"], "qa10": ["maybe", "no", "yes"],
}
TASKS = [f"qa{i}" for i in range(1, 11)]
QUESTIONS_PER_STORY = 5
MAX_SUPPORT_AGE = 4  # the newest supporting fact is 0-4 statements back
TEST_SHARE = 8  # 1 in 8 possible stories belongs to the test side

# Probability of drawing each action for a statement; an action with no legal arguments is redrawn. The
# weights were fitted (by iterating generate -> compare -> reweight) so that the *written* mix, the answer
# shares, the support recency and the question gaps match the real en-10k files (babilong.md §2.3).
ACTION_WEIGHTS = {
    "qa2": {"move": 0.52, "get": 0.24, "drop": 0.24},
    "qa3": {"move": 0.51, "get": 0.22, "drop": 0.27},
    "qa5": {"move": 0.32, "get": 0.155, "drop": 0.12, "give": 0.405},
    "qa6": {"move": 0.547, "get": 0.25, "drop": 0.203},
    "qa7": {"move": 0.30, "get": 0.14, "drop": 0.11, "give": 0.45},
    "qa8": {"move": 0.528, "get": 0.26, "drop": 0.212},
    "qa9": {"move": 0.50, "is_in": 0.25, "not_in": 0.125, "no_longer": 0.125},
    "qa10": {"move": 0.50, "is_in": 0.25, "either": 0.25},
}
# Probability of asking at a pair boundary when something is eligible, by the age of the freshest
# eligible support (0..4 statements back).
ASK_PROB = {
    "qa1": [1.0] * 5, "qa9": [1.0] * 5, "qa10": [1.0] * 5, "qa7": [1.0] * 5, "qa8": [1.0] * 5,
    "qa2": [0.985, 0.92, 0.83, 0.75, 0.66],
    "qa3": [0.74, 0.69, 0.64, 0.59, 0.54],
    "qa5": [0.98, 1.0, 1.0, 1.0, 1.0],
    "qa6": [1.0, 1.0, 0.99, 0.96, 0.91],
}
# Weight of an eligible question by the age of its newest support: the real data favour fresh facts.
_FRESH = [1.0, 0.9, 0.77, 0.65, 0.52]
RECENCY_WEIGHTS = {
    "qa1": _FRESH, "qa9": _FRESH, "qa10": _FRESH, "qa5": [1.0] * 5,
    "qa2": [1.64, 1.5, 1.41, 1.17, 1.0], "qa3": [3.7, 1.6, 0.9, 0.42, 0.25],
    "qa6": [1.8, 1.73, 1.57, 1.33, 1.21], "qa7": [1.53, 1.16, 1.03, 1.06, 1.02],
    "qa8": [1.02, 1.5, 1.03, 1.07, 0.72],
}
QA5_FORMS = [("what", 0.34), ("who_gave", 0.17), ("who_gave_to", 0.17), ("who_received", 0.16),
             ("whom", 0.16)]
RECIPIENT_WEIGHT = 0.3
# A story that has not finished by then is abandoned and redrawn (rare): keeps lengths in the real ranges.
MAX_STATEMENTS = {"qa2": 88, "qa3": 228, "qa5": 126, "qa6": 26, "qa7": 52, "qa8": 50}


@dataclass
class Candidate:
    """An eligible question: its text, answer and supporting statements (0-based statement indices)."""

    text: str
    answer: str
    support: list[int]
    age: int
    weight: float = 1.0  # relative to other candidates of the same age


@dataclass
class CarriedMove:
    """A move of an object's holder while holding it: the only room changes qa3 asks about."""

    room: str
    move: int  # the MOVE statement
    period: int  # which holding period (one GET ... DROP) it belongs to


@dataclass
class World:
    rng: random.Random
    actors: list[str]
    rooms: list[str]
    # hidden state
    loc: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str | None] = field(default_factory=dict)
    obj_room: dict[str, str] = field(default_factory=dict)
    # reader knowledge
    known_loc: dict[str, str | None] = field(default_factory=dict)
    last_move: dict[str, int | None] = field(default_factory=dict)
    belief: dict[str, tuple] = field(default_factory=dict)  # qa9/qa10: ("at"|"not"|"either", rooms, statement)
    holds: dict[str, list[str]] = field(default_factory=dict)  # acquisition order
    ever_held: dict[str, bool] = field(default_factory=dict)
    holding_lines: dict[str, list[int]] = field(default_factory=dict)  # GET/DROP/GIVE lines changing holdings
    obj_known: dict[str, bool] = field(default_factory=dict)
    obj_get: dict[str, int | None] = field(default_factory=dict)
    obj_drop: dict[str, tuple | None] = field(default_factory=dict)  # (line, room, dropper's move) if known
    carried: dict[str, list[CarriedMove]] = field(default_factory=dict)
    periods: dict[str, list[list]] = field(default_factory=dict)  # per object: [GET line, DROP line or None]
    received: dict[str, set] = field(default_factory=dict)  # actor -> GIVE lines where they were the recipient
    last_give: tuple | None = None  # (line, giver, object, recipient)
    statements: list[str] = field(default_factory=list)

    def __post_init__(self):
        for a in self.actors:
            self.loc[a] = self.rng.choice(self.rooms)
            self.known_loc[a] = self.last_move[a] = None
            self.holds[a], self.ever_held[a], self.holding_lines[a] = [], False, []
            self.received[a] = set()
        for o in OBJECTS:
            self.holder[o] = None
            self.obj_room[o] = self.rng.choice(self.rooms)
            self.obj_known[o] = False
            self.obj_get[o] = self.obj_drop[o] = None
            self.carried[o], self.periods[o] = [], []

    @property
    def n(self) -> int:
        return len(self.statements)

    # -------------------------------------------------------------------------------------- actions

    def move(self, verb: str) -> str | None:
        a = self.rng.choice(self.actors)
        room = self.rng.choice([r for r in self.rooms if r != self.loc[a]])
        i = self.n
        self.loc[a] = room
        self.known_loc[a], self.last_move[a] = room, i
        self.belief[a] = ("at", (room,), i)
        for o in self.holds[a]:
            self.obj_room[o] = room
            self.obj_known[o] = True
            self.carried[o].append(CarriedMove(room, i, len(self.periods[o]) - 1))
        return f"{a} {verb} to the {room}."

    def get(self, verb: str, there: bool) -> str | None:
        options = [(a, o) for a in self.actors for o in OBJECTS
                   if self.holder[o] is None and self.obj_room[o] == self.loc[a]]
        if not options:
            return None
        a, o = self.rng.choice(options)
        i = self.n
        self.holder[o] = a
        self.holds[a].append(o)
        self.ever_held[a] = True
        self.holding_lines[a].append(i)
        self.obj_get[o] = i
        self.obj_drop[o] = None
        self.periods[o].append([i, None])
        if self.known_loc[a] is not None:
            self.obj_known[o] = True
        return f"{a} {verb} the {o}{' there' if there else ''}."

    def drop(self, verb: str, there: bool) -> str | None:
        options = [(a, o) for a in self.actors for o in self.holds[a]]
        if not options:
            return None
        a, o = self.rng.choice(options)
        i = self.n
        self.holder[o] = None
        self.holds[a].remove(o)
        self.holding_lines[a].append(i)
        self.periods[o][-1][1] = i
        known = self.known_loc[a] is not None
        self.obj_drop[o] = (i, self.loc[a], self.last_move[a]) if known else None
        self.obj_known[o] = self.obj_known[o] or known  # an object seen somewhere stays where it was left
        return f"{a} {verb} the {o}{' there' if there else ''}."

    def give(self, verb: str) -> str | None:
        options = [(a, b) for a in self.actors for b in self.actors
                   if b != a and self.holds[a] and self.loc[b] == self.loc[a]]
        if not options:
            return None
        a, b = self.rng.choice(options)
        # The real files give the first held object in vocabulary order (apple 41%, football 33%, milk 26%).
        o = min(self.holds[a], key=OBJECTS.index)
        i = self.n
        self.holder[o] = b
        self.holds[a].remove(o)
        self.holds[b].append(o)
        self.ever_held[b] = True
        self.holding_lines[a].append(i)
        self.holding_lines[b].append(i)
        self.received[b].add(i)
        self.last_give = (i, a, o, b)
        return f"{a} {verb} the {o} to {b}."

    def is_in(self) -> str:
        a, room = self.rng.choice(self.actors), self.rng.choice(self.rooms)
        self.loc[a] = room
        self.belief[a] = ("at", (room,), self.n)
        return f"{a} is in the {room}."

    def not_in(self, phrase: str) -> str:
        a, room = self.rng.choice(self.actors), self.rng.choice(self.rooms)
        if self.loc[a] == room:  # the statement must be true: the actor has left for some other room
            self.loc[a] = self.rng.choice([r for r in self.rooms if r != room])
        self.belief[a] = ("not", (room,), self.n)
        return f"{a} {phrase} the {room}."

    def either(self) -> str:
        a = self.rng.choice(self.actors)
        first, second = self.rng.sample(self.rooms, 2)
        self.loc[a] = self.rng.choice([first, second])
        self.belief[a] = ("either", (first, second), self.n)
        return f"{a} is either in the {first} or the {second}."


# ------------------------------------------------------------------------------------------ statements


def _statement(task: str, w: World) -> str:
    rng = w.rng
    weights = ACTION_WEIGHTS.get(task, {"move": 1.0})
    kinds, probs = list(weights), list(weights.values())
    while True:
        kind = rng.choices(kinds, probs)[0]
        if kind == "move":
            return w.move(rng.choice(MOVE_VERBS))
        if kind == "get":
            there = task != "qa3" or rng.random() < 0.2
            text = w.get(rng.choice(GET_VERBS), there)
        elif kind == "drop":
            text = w.drop(rng.choice(DROP_VERBS), rng.random() < 0.2)
        elif kind == "give":
            text = w.give(rng.choice(GIVE_VERBS))
        elif kind == "is_in":
            text = w.is_in()
        elif kind == "not_in":
            text = w.not_in("is not in")
        elif kind == "no_longer":
            text = w.not_in("is no longer in")
        else:
            text = w.either()
        if text is not None:
            return text


# ------------------------------------------------------------------------------------------- questions


def _age(w: World, newest: int) -> int:
    return w.n - 1 - newest


class _Eligible:
    """Collects the questions whose newest supporting fact is recent enough to ask about."""

    def __init__(self, w: World):
        self.w, self.out = w, []

    def add(self, text: str, answer: str, support: list[int], weight: float = 1.0) -> None:
        age = _age(self.w, max(support))
        if age <= MAX_SUPPORT_AGE:
            self.out.append(Candidate(text, answer, support, age, weight))


def _where_is_actor(w: World, q: _Eligible) -> None:  # qa1
    for a in w.actors:
        if w.last_move[a] is not None:
            q.add(f"Where is {a}?", w.known_loc[a], [w.last_move[a]])


def _where_is_object(w: World, q: _Eligible) -> None:  # qa2
    for o in OBJECTS:
        h = w.holder[o]
        if h is not None:
            get, move = w.obj_get[o], w.last_move[h]
            if move is not None and get is not None and move > get:  # carried somewhere since the GET
                q.add(f"Where is the {o}?", w.known_loc[h], [get, move])
        elif w.obj_drop[o] is not None and w.obj_drop[o][2] is not None:
            line, room, move = w.obj_drop[o]
            q.add(f"Where is the {o}?", room, [line, move])


def _where_was_object_before(w: World, q: _Eligible) -> None:  # qa3
    # "Where was O before L?": two consecutive moves of one holder carrying O (the real data never mix holders
    # or use the room where O was picked up); L is the most recent occurrence of that room.
    for o in OBJECTS:
        carried = w.carried[o]
        seen: set[str] = set()
        for j in range(len(carried) - 1, 0, -1):
            here, before = carried[j], carried[j - 1]
            if here.room in seen:
                continue
            seen.add(here.room)
            if before.period == here.period:
                get, drop = w.periods[o][here.period]
                line = drop if drop is not None else get
                q.add(f"Where was the {o} before the {here.room}?", before.room, [line, here.move, before.move])


def _who_gave_what(w: World, q: _Eligible) -> None:  # qa5: one question about the newest GIVE
    if w.last_give is None:
        return
    line, a, o, b = w.last_give
    form = w.rng.choices([f for f, _ in QA5_FORMS], [p for _, p in QA5_FORMS])[0]
    text, answer = {
        "what": (f"What did {a} give to {b}?", o),
        "who_gave": (f"Who gave the {o}?", a),
        "who_gave_to": (f"Who gave the {o} to {b}?", a),
        "who_received": (f"Who received the {o}?", b),
        "whom": (f"Who did {a} give the {o} to?", b),
    }[form]
    q.add(text, answer, [line])


def _yes_or_no(w: World, q: _Eligible, a: str, room: str, line: int) -> None:
    """Half the time "Is a in <the room a is in>?" (yes), else about another room (no)."""
    if w.rng.random() < 0.5:
        q.add(f"Is {a} in the {room}?", "yes", [line])
    else:
        other = w.rng.choice([r for r in w.rooms if r != room])
        q.add(f"Is {a} in the {other}?", "no", [line])


def _is_actor_in(w: World, q: _Eligible) -> None:  # qa6: yes/no about the newest move
    for a in w.actors:
        if w.last_move[a] is not None:
            _yes_or_no(w, q, a, w.known_loc[a], w.last_move[a])


def _holders(w: World):
    """(actor, weight) of each actor who has held something; real qa7 asks about the giver of a GIVE far more
    often than about its recipient."""
    for a in w.actors:
        if w.ever_held[a] and w.holding_lines[a]:
            yield a, RECIPIENT_WEIGHT if w.holding_lines[a][-1] in w.received[a] else 1.0


def _how_many_carried(w: World, q: _Eligible) -> None:  # qa7
    for a, weight in _holders(w):
        q.add(f"How many objects is {a} carrying?", NUMBER_WORDS[len(w.holds[a])], list(w.holding_lines[a]), weight)


def _what_carried(w: World, q: _Eligible) -> None:  # qa8
    for a, _ in _holders(w):
        q.add(f"What is {a} carrying?", ",".join(w.holds[a]) or "nothing", list(w.holding_lines[a]))


def _is_actor_in_belief(w: World, q: _Eligible) -> None:  # qa9 (negation), qa10 (indefinite knowledge)
    for a in w.actors:
        if a not in w.belief:
            continue
        kind, rooms, line = w.belief[a]
        if kind == "at":
            _yes_or_no(w, q, a, rooms[0], line)
        elif kind == "not":
            q.add(f"Is {a} in the {rooms[0]}?", "no", [line])
        elif w.rng.random() < 0.58:  # either
            q.add(f"Is {a} in the {w.rng.choice(rooms)}?", "maybe", [line])
        else:
            other = w.rng.choice([r for r in w.rooms if r not in rooms])
            q.add(f"Is {a} in the {other}?", "no", [line])


QUESTIONS = {  # qa4 stories are built whole (_story_qa4)
    "qa1": _where_is_actor, "qa2": _where_is_object, "qa3": _where_was_object_before, "qa5": _who_gave_what,
    "qa6": _is_actor_in, "qa7": _how_many_carried, "qa8": _what_carried, "qa9": _is_actor_in_belief,
    "qa10": _is_actor_in_belief,
}


def _candidates(task: str, w: World) -> list[Candidate]:
    """The questions of `task` that could be asked now."""
    eligible = _Eligible(w)
    QUESTIONS[task](w, eligible)
    return eligible.out


# ---------------------------------------------------------------------------------------------- stories


def _world_for(task: str, rng: random.Random) -> World:
    actors = {"qa5": ACTORS_QA5, "qa10": ACTORS_QA10}.get(task, ACTORS)
    return World(rng, list(actors), PLACES if task == "qa10" else ROOMS)


def _story_qa4(rng: random.Random) -> Story:
    a, b, c = rng.sample(ROOMS, 3)  # a line of rooms: a - b - c, b in the middle
    forward, backward = rng.choice([("north", "south"), ("east", "west")])
    # Facts link b to a and b to c: "a is forward of b" and "b is forward of c" (each may be said either way).
    relations = [(a, forward, b), (b, forward, c)]
    facts = []
    for x, rel, y in relations:
        if rng.random() < 0.5:
            facts.append((x, rel, y))
        else:
            facts.append((y, backward if rel == forward else forward, x))
    rng.shuffle(facts)
    k = rng.randrange(2)
    x, rel, y = facts[k]
    if rng.random() < 0.5:  # ask about the inverse relation
        x, rel, y = y, backward if rel == forward else forward, x
    if rng.random() < 0.5:
        question, answer = f"What is {rel} of the {y}?", x
    else:
        question, answer = f"What is the {x} {rel} of?", y
    lines = [Line(f"The {fx} is {frel} of the {fy}.") for fx, frel, fy in facts]
    lines.append(Line(question, answer, [k + 1]))
    return Story("qa4", lines)


def _story(task: str, rng: random.Random) -> Story | None:
    if task == "qa4":
        return _story_qa4(rng)
    w = _world_for(task, rng)
    lines: list[Line] = []
    line_of_statement: list[int] = []
    asked = 0
    while asked < QUESTIONS_PER_STORY:
        if w.n >= MAX_STATEMENTS.get(task, 10):
            return None
        for _ in range(2):
            text = _statement(task, w)
            w.statements.append(text)
            lines.append(Line(text))
            line_of_statement.append(len(lines))
        candidates = _candidates(task, w)
        if not candidates:
            continue
        freshest = min(c.age for c in candidates)
        if rng.random() >= ASK_PROB[task][freshest]:
            continue
        weights = [RECENCY_WEIGHTS[task][c.age] * c.weight for c in candidates]
        q = rng.choices(candidates, weights)[0]
        lines.append(Line(q.text, q.answer, [line_of_statement[s] for s in q.support]))
        asked += 1
    return Story(task, lines)


def story_side(story: Story) -> str:
    """"test" for 1 in TEST_SHARE possible stories (by a hash of the text), otherwise "train"."""
    from lm2cli.data.babi import format_story

    digest = hashlib.sha1(format_story(story).encode("utf-8")).digest()
    return "test" if digest[0] % TEST_SHARE == 0 else "train"


def story_rng(task: str, split: str, seed: int, index: int) -> random.Random:
    # Seeding with a string hashes it (sha512), independent of PYTHONHASHSEED and of other stories.
    return random.Random(f"lm2-babi/{task}/{split}/{seed}/{index}")


def generate_story(task: str, split: str, seed: int, index: int) -> Story:
    """Story `index` of the (task, split, seed) stream: always the same story, always on `split`'s side."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    rng = story_rng(task, split, seed, index)
    while True:
        story = _story(task, rng)
        if story is not None and story_side(story) == split:
            return story


def generate_stories(task: str, split: str, seed: int, n_questions: int | None = None,
                     n_stories: int | None = None, start: int = 0, verify: bool = True) -> Iterator[Story]:
    """Stories of one stream until `n_questions` questions (or `n_stories` stories) have been written.

    With `verify`, every answer is re-derived by the independent checker (lm2cli.data.checker); a mismatch
    is a bug in one of them and raises AssertionError.
    """
    from lm2cli.data.checker import check_story

    questions = stories = 0
    index = start
    while (n_questions is None or questions < n_questions) and (n_stories is None or stories < n_stories):
        story = generate_story(task, split, seed, index)
        if verify:
            check_story(story)
        yield story
        questions += sum(ln.is_question for ln in story.lines)
        stories += 1
        index += 1
