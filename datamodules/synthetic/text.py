"""Prompts and detailed captions of synthetic clips, written from varied templates.

The **prompt** is what a user would type: the first object's colour, shape and motion
(sometimes its speed, sometimes a second object). The **caption** states everything: the
background, the number of objects and, for every object, size, colour, shape, start cell,
motion and speed. Every word comes from the tables and templates below, so
:data:`VOCABULARY` is complete and :mod:`datamodules.synthetic.parse` can read the texts back.
"""

from __future__ import annotations

import re

import numpy as np

from datamodules.synthetic.world import COLOURS, SHAPES, SIZES

BACKGROUND_WORDS = {"black": "black", "white": "white", "grey": "grey", "navy": "dark blue"}
CELL_WORDS = {
    "top-left": "top left",
    "top-centre": "top",
    "top-right": "top right",
    "middle-left": "left",
    "middle-centre": "centre",
    "middle-right": "right",
    "bottom-left": "bottom left",
    "bottom-centre": "bottom",
    "bottom-right": "bottom right",
}
CORNER_PLACES = ("in the {cell} corner", "at the {cell}")
EDGE_PLACES = ("at the {cell}", "on the {cell} side")
CENTRE_PLACES = ("in the centre", "at the centre", "in the middle")
MOVE_VERBS = {"moves": "moving", "drifts": "drifting", "slides": "sliding", "glides": "gliding"}
STILL_PHRASES = {
    "stays still": "staying still",
    "does not move": "not moving",
    "remains still": "remaining still",
    "stays in place": "staying in place",
}
SPEED_WORDS = {"slow": ("slowly",), "fast": ("quickly", "fast")}
DIRECTION_WORDS = {
    "left": ("to the left", "left"),
    "right": ("to the right", "right"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
COUNT_NOUNS = {"object": "objects", "shape": "shapes"}

MOVING_CLAUSES = (
    "{np} starts {place} and {verb} {speed} {dir}",
    "{np} {verb} {speed} {dir}, starting {place}",
    "{np} begins {place} and {verb} {dir} {speed}",
)
STILL_CLAUSES = (
    "{np} sits {place} and {still}",
    "{np} {still} {place}",
    "{np} is {place} and {still}",
)
PROMPT_CLAUSES = ("{np} {verb} {speed} {dir}", "{np} {verb} {dir} {speed}")
PROMPT_PARTICIPLES = ("{np} {verb_ing} {speed} {dir}",)
PROMPT_SINGLE = ("{c0}", "{p0}", "video of {p0}", "a clip of {p0}")
PROMPT_PAIR = ("{c0} and {c1}", "{c0} while {c1}", "{p0} and {p1}", "{p0} next to {p1}")
CAPTIONS = (
    "There {count_is} on {bg_np}. {sentences}",
    "On {bg_np}, there {count_is}: {clauses}.",
    "{sentences} The background is {bg}, and there {count_is} in total.",
    "{Bg_np} with {count_np}. {sentences}",
)
PUNCTUATION = (".", ",", ";", ":")

_SPACES = re.compile(r"\s+")
_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")


def _tidy(text: str) -> str:
    return _BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", text)).strip()


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[rng.integers(len(options))]


def place_phrase(rng: np.random.Generator, cell: str) -> str:
    """A phrase for a start cell, e.g. ``"in the top left corner"`` or ``"at the centre"``."""
    if cell == "middle-centre":
        return _pick(rng, CENTRE_PLACES)
    row, col = cell.split("-")
    corner = row != "middle" and col != "centre"
    if corner:
        templates = CORNER_PLACES
    elif col == "centre":
        templates = ("at the {cell}",)  # top / bottom edge
    else:
        templates = EDGE_PLACES
    return _pick(rng, templates).format(cell=CELL_WORDS[cell])


def _noun_phrase(obj: dict, det: str, with_size: bool) -> str:
    size = obj["size"] if with_size else ""
    return f"{det} {size} {obj['colour']} {obj['shape']}"


def _motion_fields(rng: np.random.Generator, obj: dict, with_speed: bool) -> dict:
    verb = _pick(rng, MOVE_VERBS)
    still = _pick(rng, STILL_PHRASES)
    speed = _pick(rng, SPEED_WORDS[obj["speed"]]) if with_speed and obj["motion"] != "still" else ""
    direction = _pick(rng, DIRECTION_WORDS[obj["motion"]]) if obj["motion"] != "still" else ""
    return {
        "verb": verb,
        "verb_ing": MOVE_VERBS[verb],
        "still": still,
        "still_ing": STILL_PHRASES[still],
        "speed": speed,
        "dir": direction,
    }


def object_clause(rng: np.random.Generator, obj: dict, det: str = "a") -> str:
    """A full description of one object (size, colour, shape, start cell, motion, speed)."""
    fields = _motion_fields(rng, obj, with_speed=True)
    fields["np"] = _noun_phrase(obj, det, with_size=True)
    fields["place"] = place_phrase(rng, obj["start"])
    templates = STILL_CLAUSES if obj["motion"] == "still" else MOVING_CLAUSES
    return _tidy(_pick(rng, templates).format(**fields))


def _prompt_forms(rng: np.random.Generator, obj: dict, with_speed: bool) -> tuple[str, str]:
    """(clause, participle) forms of an object for prompts: colour, shape, motion."""
    fields = _motion_fields(rng, obj, with_speed)
    fields["np"] = _noun_phrase(obj, "a", with_size=False)
    if obj["motion"] == "still":
        return _tidy("{np} {still}".format(**fields)), _tidy("{np} {still_ing}".format(**fields))
    clause = _pick(rng, PROMPT_CLAUSES).format(**fields)
    return _tidy(clause), _tidy(_pick(rng, PROMPT_PARTICIPLES).format(**fields))


def write_prompt(rng: np.random.Generator, scene: dict) -> tuple[str, list[int], list[str]]:
    """The short prompt of a scene.

    Returns:
        ``(prompt, prompt_objects, prompt_attributes)``: the text, the indices of the objects
        it mentions and the attributes it states for them (``speed`` only applies to moving
        objects).
    """
    objects = scene["objects"]
    mentioned = [0, 1] if len(objects) > 1 and rng.random() < 0.35 else [0]
    with_speed = bool(rng.random() < 0.5)
    forms = [_prompt_forms(rng, objects[i], with_speed) for i in mentioned]
    fields = {f"c{k}": f[0] for k, f in enumerate(forms)} | {
        f"p{k}": f[1] for k, f in enumerate(forms)
    }
    template = _pick(rng, PROMPT_PAIR if len(mentioned) > 1 else PROMPT_SINGLE)
    attributes = ["colour", "shape", "motion"] + (["speed"] if with_speed else [])
    return _tidy(template.format(**fields)), mentioned, attributes


def write_caption(rng: np.random.Generator, scene: dict) -> str:
    """The detailed caption of a scene: background, count and every object in full."""
    count = scene["count"]
    noun = _pick(rng, COUNT_NOUNS)
    count_np = f"{COUNT_WORDS[count]} {noun if count == 1 else COUNT_NOUNS[noun]}"
    bg = BACKGROUND_WORDS[scene["background"]]
    clauses = [object_clause(rng, obj) for obj in scene["objects"]]
    fields = {
        "count_is": f"{'is' if count == 1 else 'are'} {count_np}",
        "count_np": count_np,
        "bg": bg,
        "bg_np": f"a {bg} background",
        "Bg_np": f"A {bg} background",
        "sentences": " ".join(c[0].upper() + c[1:] + "." for c in clauses),
        "clauses": "; ".join(clauses),
    }
    return _tidy(_pick(rng, CAPTIONS).format(**fields))


def words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens of a text (the word-level tokenization)."""
    return re.findall(r"[a-z]+|[.,;:]", text.lower())


def _vocabulary() -> tuple[str, ...]:
    sources: list[str] = [
        *SHAPES,
        *COLOURS,
        *SIZES,
        *BACKGROUND_WORDS.values(),
        *CELL_WORDS.values(),
        *CORNER_PLACES,
        *EDGE_PLACES,
        *CENTRE_PLACES,
        *MOVE_VERBS,
        *MOVE_VERBS.values(),
        *STILL_PHRASES,
        *STILL_PHRASES.values(),
        *(w for ws in SPEED_WORDS.values() for w in ws),
        *(w for ws in DIRECTION_WORDS.values() for w in ws),
        *COUNT_WORDS.values(),
        *COUNT_NOUNS,
        *COUNT_NOUNS.values(),
        *MOVING_CLAUSES,
        *STILL_CLAUSES,
        *PROMPT_CLAUSES,
        *PROMPT_PARTICIPLES,
        *PROMPT_SINGLE,
        *PROMPT_PAIR,
        *CAPTIONS,
        "a is are",
    ]
    plain = re.sub(r"\{[^}]*\}", " ", " ".join(sources))
    return tuple(sorted(set(words(plain)) - set(PUNCTUATION))) + PUNCTUATION


VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word (lower case) the prompts and captions use, then the punctuation tokens."""
