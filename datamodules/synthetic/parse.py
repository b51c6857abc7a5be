"""Read a (generated) prompt or caption back into a scene description and score it.

The parser is a small rule set over the world's vocabulary (plus a few synonyms), tolerant
of word order: an object is a mention ``[size] colour shape``; everything up to the next
mention belongs to it. Inside that span, a place is a preposition + ``the`` + cell words
(``"at the top left"``, ``"in the centre"``), a direction is ``left/right/up/down`` outside a
place (``"to the left"``, ``"upward"``), a speed is ``slowly/quickly/fast``, and ``still`` /
``not move`` / ``in place`` mean no motion. The background is ``<colour> background`` or
``background is <colour>``; the count is ``<number> objects|shapes``.
"""

from __future__ import annotations

import re

import numpy as np

from datamodules.synthetic.scoring import AttributeScore, Scope, score_scene
from datamodules.synthetic.text import BACKGROUND_WORDS, COUNT_WORDS, words, write_prompt
from datamodules.synthetic.world import COLOURS, SHAPES

SIZE_SYNONYMS = {
    "small": "small",
    "little": "small",
    "tiny": "small",
    "large": "large",
    "big": "large",
}
SPEED_SYNONYMS = {
    "slowly": "slow",
    "slow": "slow",
    "quickly": "fast",
    "fast": "fast",
    "rapidly": "fast",
}
DIRECTION_SYNONYMS = {
    "left": "left",
    "leftward": "left",
    "leftwards": "left",
    "right": "right",
    "rightward": "right",
    "rightwards": "right",
    "up": "up",
    "upward": "up",
    "upwards": "up",
    "down": "down",
    "downward": "down",
    "downwards": "down",
}
BACKGROUND_SYNONYMS = {v: k for k, v in BACKGROUND_WORDS.items()} | {"gray": "grey", "navy": "navy"}
NUMBER_WORDS = {v: k for k, v in COUNT_WORDS.items()} | {"single": 1, "1": 1, "2": 2, "3": 3}
PLACE_PREPOSITIONS = ("at", "in", "on", "from", "near")
ROW_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
COLUMN_WORDS = {"left": "left", "right": "right"}
CENTRE_WORDS = ("centre", "center", "middle")

_BG_NAMES = "|".join(sorted(BACKGROUND_SYNONYMS, key=len, reverse=True))
_BACKGROUND = re.compile(rf"\b({_BG_NAMES}) background\b|\bbackground (?:is|of) ({_BG_NAMES})\b")
_COUNT = re.compile(r"\b(one|two|three|single|1|2|3) (?:objects?|shapes?)\b")
_SHAPE_PLURALS = {f"{s}s": s for s in SHAPES} | {"crosses": "cross"}


def _place(tokens: list[str], i: int) -> tuple[str | None, int]:
    """A start cell at ``tokens[i:]`` (``prep the [row] [column|centre] ...``) and its length."""
    if i + 2 >= len(tokens) or tokens[i] not in PLACE_PREPOSITIONS or tokens[i + 1] != "the":
        return None, 0
    j = i + 2
    row = ROW_WORDS.get(tokens[j]) if j < len(tokens) else None
    j += row is not None
    col = COLUMN_WORDS.get(tokens[j]) if j < len(tokens) else None
    if col is None and j < len(tokens) and tokens[j] in CENTRE_WORDS:
        col, j = "centre", j + 1
    elif col is not None:
        j += 1
    if row is None and col is None:
        return None, 0
    return f"{row or 'middle'}-{col or 'centre'}", j - i


def _still(tokens: list[str]) -> bool:
    text = " ".join(tokens)
    return bool(re.search(r"\bstill\b|\bnot (?:move|moving)\b|\bin place\b|\bstationary\b", text))


def _object(mention: tuple[str | None, str, str], span: list[str]) -> dict:
    size, colour, shape = mention
    obj = {
        "colour": colour,
        "shape": shape,
        "size": size,
        "start": None,
        "motion": None,
        "speed": None,
    }
    rest: list[str] = []
    i = 0
    while i < len(span):
        cell, n = _place(span, i)
        if cell is not None:
            obj["start"] = obj["start"] or cell
            i += n
            continue
        rest.append(span[i])
        i += 1
    for tok in rest:
        if tok in SIZE_SYNONYMS and obj["size"] is None:
            obj["size"] = SIZE_SYNONYMS[tok]
        elif tok in SPEED_SYNONYMS and obj["speed"] is None:
            obj["speed"] = SPEED_SYNONYMS[tok]
        elif tok in DIRECTION_SYNONYMS and obj["motion"] is None:
            obj["motion"] = DIRECTION_SYNONYMS[tok]
    if obj["motion"] is None and _still(rest):
        obj["motion"], obj["speed"] = "still", "none"
    return obj


def _mentions(tokens: list[str]) -> list[tuple[int, int, tuple[str | None, str, str]]]:
    """``(start, end, (size, colour, shape))`` of every ``[size] colour shape`` mention."""
    found = []
    for i in range(len(tokens) - 1):
        colour, shape = tokens[i], _SHAPE_PLURALS.get(tokens[i + 1], tokens[i + 1])
        if colour in COLOURS and shape in SHAPES:
            size = SIZE_SYNONYMS.get(tokens[i - 1]) if i > 0 else None
            found.append((i - (size is not None), i + 2, (size, colour, shape)))
    return found


def parse_text(text: str) -> dict:
    """Parse a prompt or caption into a scene description.

    Returns:
        ``{"background", "count", "objects": [{"colour", "shape", "size", "start", "motion",
        "speed"}]}``, ``None`` where the text does not say. Mentions of the same coloured
        shape are merged (the first statement of an attribute wins).
    """
    lowered = " ".join(words(text))
    bg = _BACKGROUND.search(lowered)
    background = BACKGROUND_SYNONYMS[bg.group(1) or bg.group(2)] if bg else None
    count_match = _COUNT.search(lowered)
    count = NUMBER_WORDS[count_match.group(1)] if count_match else None
    tokens = [t for t in _BACKGROUND.sub(" ", lowered).split() if t not in ".,;:"]
    mentions = _mentions(tokens)
    objects: dict[tuple[str, str], dict] = {}
    for k, (_, end, mention) in enumerate(mentions):
        stop = mentions[k + 1][0] if k + 1 < len(mentions) else len(tokens)
        obj = _object(mention, tokens[end:stop])
        previous = objects.setdefault((obj["colour"], obj["shape"]), obj)
        for attr, value in obj.items():
            if previous[attr] is None:
                previous[attr] = value
    return {"background": background, "count": count, "objects": list(objects.values())}


def score_caption(text: str, record: dict, scope: Scope = "all") -> AttributeScore:
    """Score a generated caption (``scope="all"``) or prompt (``scope="prompt"``) against a
    clip's record: every expected attribute that the text misses or gets wrong is ``False``.
    ``scope="stated"`` scores only what the text says (is it true of the clip?)."""
    return score_scene(parse_text(text), record, scope)


def prompt_ceiling(record: dict, draws: int = 8) -> float:
    """What a perfect prompt writer scores on a clip with ``scope="prompt"``.

    A clip's prompt names one object of several at random and states the speed half the time,
    so a reader that writes an equally true prompt for the video cannot know which object and
    whether speed will be asked for. This scores ``draws`` prompts written for the clip's scene
    by the world's own templates (fresh random choices) against its record, and averages.
    """
    scene = {"background": record["background"], "count": record["count"]}
    scene["objects"] = record["objects"]
    rng = np.random.default_rng([record["seed"], record["index"], 7])
    scores = [
        score_caption(write_prompt(rng, scene)[0], record, "prompt").accuracy for _ in range(draws)
    ]
    return float(np.mean(scores))
