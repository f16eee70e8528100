"""A synthetic reasoning-segmentation benchmark, generated deterministically from a seed.

Scenes: RGB images on a plain grey background holding 2 to `max_objects` non-overlapping shapes
(circle, square, triangle, hexagon, star) of six colours, random size (relative to the short side),
position anywhere in the frame and a small rotation. Every object has an exact mask. Frames are
`image_size` x `image_size` (128) by default; `aspect_ratios` (ASPECT_RATIOS: 1:1, 4:3, 16:9) and
`image_sizes` (short sides) give each scene a drawn shape instead.

Queries need reasoning rather than naming the target:
- attribute: "red shape" (the only red one), "blue triangle" (the only one of that colour and shape
  where neither alone is unique);
- size: "largest shape", "smallest shape" (only when it is at least 1.3x the next by area);
- relation: "Which shape is left of the largest shape?" (left of / right of / above / below a uniquely
  described reference; exactly one shape may qualify);
- function and knowledge: "Which shape would roll?" (circle), "Which shape has three corners?"
  (triangle), four equal sides (square), six corners (hexagon), five points (star), "Which shape has the
  colour of grass?" (green), the sky (blue), a banana (yellow), a tomato (red), an orange (orange),
  grapes (purple);
- several targets: "Find both triangles.", "Find all the red shapes.", "Which shapes would roll?";
- absent: a colour/shape pair or a property that no object has.
Questions: phrases ("red shape") use LISA's short question templates, sentences its long ones (the
OFFICIAL phrasing). With `official_rate` below 1, training questions are otherwise worded in the
TRAINED phrasings of training.data.phrasing (commands, questions, polite forms, bare noun phrases,
synonyms of "shape"); `eval_phrasing` asks evaluation queries in the official question (default), a
TRAINED or a HELD_OUT phrasing (templates and nouns no training sample and no tokenizer corpus sees).
With `unknown_word_rate` above 0, that share of the TRAINED-phrased training questions gets 1 to
MAX_UNKNOWN_WORDS made-up words (phrasing.pseudo_word: none is a word of `vocabulary()`) in place of a
template word or the generic noun, or inserted: practice at reading past words the model never saw.
With `unnamed_colour_rate` above 0, that share of the objects is painted in a colour of no name
(UNNAMED: drawn at least UNNAMED_COLOUR_DISTANCE from every named colour and from the grey background):
such an object is only ever asked about and explained by its shape, size and place ("The circle would
roll because it is round."), so each shape is seen in many colours: practice at recognising a shape
whatever its colour, which the held-out compositions need. The hold-out stays exact: no held-out pair,
and no colour near one, is ever drawn outside "test".
With the defaults (one size, one ratio, official_rate 1, no unknown words, no unnamed colours) the
splits are exactly those first shipped.

Answers: one [SEG] per target, targets ordered left to right (then top to bottom), masks in that order:
LISA's answer templates for one target ("Sure, [SEG]."), "Sure, [SEG] and [SEG]." style for several,
and ABSENT_ANSWER with no [SEG] when nothing matches. With probability `explanatory_rate` (0.1) a
query with a target is asked with an explanatory suffix ("... Please output segmentation mask and
explain why.") and answered with a reason after the [SEG]s ("Sure, [SEG]. The red circle would roll
because it is round.").
`answers="explained"` (instead of "templates") answers every query with a target by the bare [SEG]s and
the explanation ("[SEG]. The red circle would roll because it is round.") and asks it plainly: the demo
model's recipe. Absent targets get ABSENT_ANSWER either way.

`kinds` restricts the query kinds (all six by default), e.g. for an easier demo task.

Splits: scene `index` of split `split` comes from numpy's generator seeded with (seed, split, index).
Compositional hold-out: HELD_OUT_PAIRS (one colour per shape) never appear in "train" or "val" scenes
and are never named in their queries; every "test" scene holds at least one held-out object and every
test query involves one (as a target or the relation's reference) or names a held-out pair (absent).
"val" is in-distribution (for tracking training), "test" measures composition.

`corpus()` lists sentences that cover every word the generator can emit in training (never the held-out
phrasings), for building a small tokenizer. `is_well_formed(answer, masks)` says whether an answer is
one the generator writes, with as many [SEG]s as masks (`explanations()` lists every explanation).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from lisa_core.config import SEG_TOKEN
from lisa_core.errors import InputError
from training.data import phrasing, templates
from training.data.phrasing import ALL_OF, PHRASE, PLURAL_PREDICATE, PREDICATE, RELATION, noun_phrase
from training.data.sample import APPEARANCE_KEY, IGNORE_LABEL, Sample

COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 160, 70),
    "blue": (50, 90, 225),
    "yellow": (235, 205, 40),
    "purple": (145, 70, 185),
    "orange": (245, 135, 35),
}
SHAPES = ("circle", "square", "triangle", "hexagon", "star")
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "hexagon"), ("purple", "star")}
)
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "val": 200, "test": 200}

# shape -> (singular verb phrase, plural verb phrase, reason)
SHAPE_FUNCTIONS = {
    "circle": ("would roll", "would roll", "it is round"),
    "triangle": ("has three corners", "have three corners", "it is a triangle"),
    "square": ("has four equal sides", "have four equal sides", "it is a square"),
    "hexagon": ("has six corners", "have six corners", "it is a hexagon"),
    "star": ("has five points", "have five points", "it is a star"),
}
# colour -> (thing, verb)
COLOUR_KNOWLEDGE = {
    "green": ("grass", "is"),
    "blue": ("the sky", "is"),
    "yellow": ("a banana", "is"),
    "red": ("a tomato", "is"),
    "orange": ("an orange", "is"),
    "purple": ("grapes", "are"),
}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
MULTI_ANSWER_TEMPLATES = ("Sure, {segs}.", "Sure, they are {segs}.", "They are {segs}.", "{segs}.")
ABSENT_ANSWER = "There is no such object in the image."
ANSWER_STYLES = ("templates", "explained")
KINDS = ("attribute", "size", "relation", "function", "multiple", "absent")
KIND_WEIGHTS = {"attribute": 1.0, "size": 1.0, "relation": 1.5, "function": 1.5, "multiple": 1.0, "absent": 0.5}
ASPECT_RATIOS = {"1:1": (1, 1), "4:3": (4, 3), "16:9": (16, 9)}  # width : height
SIZE_MARGIN = 1.3  # the largest/smallest must beat the runner-up by this area ratio
MIN_RADIUS, MAX_RADIUS = 0.07, 0.17  # fractions of the image's short side
MAX_UNKNOWN_WORDS = 2  # made-up words in one question
UNNAMED = ""  # the colour name of an object painted in a colour of no name
UNNAMED_COLOUR_DISTANCE = 100.0  # RGB distance of an unnamed colour from every named one and the background
BACKGROUND_GREYS = (200, 246)  # the background's grey level is drawn from [low, high)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y)
    radius: float
    rotation: float  # radians
    fill: tuple[int, int, int]  # RGB: COLOURS[colour], or a colour of no name (UNNAMED)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Query:
    kind: str
    text: str  # a noun phrase or a sentence
    is_sentence: bool
    targets: tuple[int, ...]  # object indices, ordered left to right
    explanation: str  # "" for absent queries
    involved: tuple[int, ...]  # targets plus a relation's reference
    named_pair: Optional[tuple[str, str]] = None  # the pair an absent query names
    form: str = PHRASE  # training.data.phrasing.FORMS
    slots: tuple[tuple[str, str], ...] = ()  # the form's slots, for phrasing.render

    def phrased(self, phrasing_name: str, rng: np.random.Generator, unknown_words: int = 0) -> str:
        """The query as a user of `phrasing_name` (phrasing.TRAINED or HELD_OUT) might word it, with
        `unknown_words` edits by made-up words."""
        return phrasing.render(self.form, dict(self.slots), phrasing_name, rng, unknown_words, vocabulary())


@dataclass
class Scene:
    objects: list[SceneObject]
    masks: list[np.ndarray]  # uint8 (height, width), one per object
    image: np.ndarray
    queries: list[Query]  # every query the split allows for this scene
    rng: np.random.Generator  # the scene's generator, after drawing the layout


APPEARANCE_CLASSES = (len(SHAPES) + 1, len(COLOURS) + 1)  # shape and colour classes, 0 the background


def appearance_labels(objects: Sequence[SceneObject], masks: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (2, H, W): each pixel's shape class and colour class (index in SHAPES / COLOURS plus 1, 0 on
    the background); the colour of an object painted in a colour of no name is IGNORE_LABEL."""
    labels = np.zeros((2, *masks[0].shape), dtype=np.uint8)
    colours = list(COLOURS)
    for obj, mask in zip(objects, masks):
        inside = mask == 1
        labels[0][inside] = SHAPES.index(obj.shape) + 1
        labels[1][inside] = IGNORE_LABEL if obj.colour == UNNAMED else colours.index(obj.colour) + 1
    return labels


def plural(shape: str) -> str:
    return shape + "s"


def join_segs(count: int) -> str:
    segs = [SEG_TOKEN] * count
    return segs[0] if count == 1 else ", ".join(segs[:-1]) + " and " + segs[-1]


def object_polygon(obj: SceneObject) -> Optional[np.ndarray]:
    """Vertices (N, 2) of a polygonal shape; None for a circle."""
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, obj.radius)
    elif obj.shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, obj.radius)
    elif obj.shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        radii = np.full(6, obj.radius)
    else:  # star
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, obj.radius, obj.radius * 0.45)
    angles = angles + obj.rotation
    x = obj.centre[0] + radii * np.cos(angles)
    y = obj.centre[1] + radii * np.sin(angles)
    return np.stack([x, y], axis=1)


def object_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    polygon = object_polygon(obj)
    if polygon is None:
        cv2.circle(mask, (int(round(obj.centre[0])), int(round(obj.centre[1]))), int(round(obj.radius)), 1, -1)
    else:
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask


class SyntheticReasonSeg:
    """One split of the benchmark; `get(index, rng)` for training, `eval_sample(index)` for evaluation."""

    name = "synthetic"

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: Optional[int] = None,
        image_size: int = 128,
        max_objects: int = 5,
        explanatory_rate: float = templates.EXPLANATORY_RATE,
        queries_per_image: int = templates.QUERIES_PER_IMAGE,
        kinds: Sequence[str] = KINDS,
        answers: str = "templates",
        aspect_ratios: Sequence[str] = ("1:1",),
        image_sizes: Optional[Sequence[int]] = None,
        official_rate: float = 1.0,
        eval_phrasing: str = phrasing.OFFICIAL,
        unknown_word_rate: float = 0.0,
        unnamed_colour_rate: float = 0.0,
    ):
        if split not in SPLITS:
            raise InputError(f"synthetic split must be one of {list(SPLITS)}, got {split!r}")
        if max_objects < 2:
            raise InputError(f"max_objects must be at least 2, got {max_objects}")
        sizes = (image_size,) if image_sizes is None else tuple(image_sizes)
        if not sizes or min(sizes) < 32:
            raise InputError(f"image sizes (short sides) must be at least 32, got {list(sizes)}")
        unknown_ratios = sorted(set(aspect_ratios) - set(ASPECT_RATIOS))
        if unknown_ratios or not aspect_ratios:
            raise InputError(f"aspect_ratios must be a non-empty subset of {list(ASPECT_RATIOS)}, got {list(aspect_ratios)}")
        if not 0.0 <= official_rate <= 1.0:
            raise InputError(f"official_rate must be within [0, 1], got {official_rate}")
        if not 0.0 <= unknown_word_rate <= 1.0:
            raise InputError(f"unknown_word_rate must be within [0, 1], got {unknown_word_rate}")
        if not 0.0 <= unnamed_colour_rate <= 1.0:
            raise InputError(f"unnamed_colour_rate must be within [0, 1], got {unnamed_colour_rate}")
        if eval_phrasing not in phrasing.PHRASINGS:
            raise InputError(f"eval_phrasing must be one of {phrasing.PHRASINGS}, got {eval_phrasing!r}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise InputError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
        if answers not in ANSWER_STYLES:
            raise InputError(f"answers must be one of {ANSWER_STYLES}, got {answers!r}")
        self.split = split
        self.seed = seed
        self.size = DEFAULT_SIZES[split] if size is None else size
        self.image_sizes = sizes
        self.aspect_ratios = tuple(aspect_ratios)
        self.official_rate = official_rate
        self.unknown_word_rate = unknown_word_rate
        self.unnamed_colour_rate = unnamed_colour_rate
        self.eval_phrasing = eval_phrasing
        self.max_objects = max_objects
        self.explanatory_rate = explanatory_rate
        self.queries_per_image = queries_per_image
        self.kinds = tuple(kinds)
        self.answers = answers

    def __len__(self) -> int:
        return self.size

    # scenes

    def _scene_rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} {self.split} scenes")
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def _draw_pair(self, rng: np.random.Generator, force_held_out: bool) -> tuple[str, str]:
        if force_held_out:
            held_out = sorted(HELD_OUT_PAIRS)
            return held_out[int(rng.integers(len(held_out)))]
        while True:
            pair = (list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if self.split == "test" or pair not in HELD_OUT_PAIRS:
                return pair

    def scene(self, index: int) -> Scene:
        """Scene `index`. A layout that supports no query of the allowed kinds is replaced by the next
        one the generator draws, so every scene has at least one query."""
        rng = self._scene_rng(index)
        for _ in range(100):
            objects, masks, image = self._layout(rng)
            queries = self.candidate_queries(objects, masks)
            if queries:
                return Scene(objects, masks, image, queries, rng)
        raise InputError(f"no scene supports a query of kinds {list(self.kinds)}; allow more kinds")

    def _draw_frame(self, rng: np.random.Generator) -> tuple[int, int]:
        """(height, width). With one size and one ratio nothing is drawn, so square scenes stay as they were."""
        side = self.image_sizes[0] if len(self.image_sizes) == 1 else self.image_sizes[int(rng.integers(len(self.image_sizes)))]
        ratio = self.aspect_ratios[0] if len(self.aspect_ratios) == 1 else self.aspect_ratios[int(rng.integers(len(self.aspect_ratios)))]
        across, down = ASPECT_RATIOS[ratio]
        return side, int(round(side * across / down))

    def _layout(self, rng: np.random.Generator) -> tuple[list[SceneObject], list[np.ndarray], np.ndarray]:
        height, width = self._draw_frame(rng)
        side = min(height, width)
        count = int(rng.integers(2, self.max_objects + 1))
        objects: list[SceneObject] = []
        for position in range(count):
            held_out = self.split == "test" and position == 0
            colour, shape = self._draw_pair(rng, force_held_out=held_out)
            fill = COLOURS[colour]
            if self.unnamed_colour_rate > 0 and not held_out and rng.random() < self.unnamed_colour_rate:
                colour, fill = UNNAMED, unnamed_colour(rng)
            for _ in range(100):
                radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS) * side)
                centre = (float(rng.uniform(radius + 2, width - radius - 2)), float(rng.uniform(radius + 2, height - radius - 2)))
                rotation = float(rng.uniform(-0.25, 0.25))
                if all(math.dist(centre, o.centre) >= radius + o.radius + 3 for o in objects):
                    objects.append(SceneObject(colour, shape, centre, radius, rotation, fill))
                    break
        background = int(rng.integers(*BACKGROUND_GREYS))
        image = np.full((height, width, 3), background, dtype=np.uint8)
        masks = [object_mask(obj, height, width) for obj in objects]
        for obj, mask in zip(objects, masks):
            image[mask == 1] = obj.fill
        return objects, masks, image

    # queries

    def candidate_queries(self, objects: list[SceneObject], masks: list[np.ndarray]) -> list[Query]:
        """Every query of the allowed kinds that the scene supports, filtered by the split's hold-out rule."""
        queries = (
            attribute_queries(objects)
            + size_queries(objects, masks)
            + relation_queries(objects, masks, min(masks[0].shape))
            + function_queries(objects)
            + multiple_queries(objects)
            + absent_queries(objects)
        )
        return [q for q in queries if q.kind in self.kinds and self._allowed(q, objects)]

    def _allowed(self, query: Query, objects: list[SceneObject]) -> bool:
        held = query.named_pair in HELD_OUT_PAIRS or any(objects[i].pair in HELD_OUT_PAIRS for i in query.involved)
        return held if self.split == "test" else not held

    def _draw_queries(self, candidates: list[Query], rng: np.random.Generator, count: int) -> list[Query]:
        remaining = list(candidates)
        chosen = []
        while remaining and len(chosen) < count:
            kinds = sorted({q.kind for q in remaining}, key=KINDS.index)
            weights = np.array([KIND_WEIGHTS[k] for k in kinds])
            kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
            of_kind = [q for q in remaining if q.kind == kind]
            query = of_kind[int(rng.integers(len(of_kind)))]
            chosen.append(query)
            remaining.remove(query)
        return chosen

    def _question(self, query: Query, rng: np.random.Generator) -> str:
        """LISA's templates with `official_rate`, else a TRAINED phrasing, with made-up words at
        `unknown_word_rate` (no draw when a rate makes it certain)."""
        if self.official_rate < 1.0 and rng.random() >= self.official_rate:
            unknown = 0
            if self.unknown_word_rate > 0 and rng.random() < self.unknown_word_rate:
                unknown = int(rng.integers(1, MAX_UNKNOWN_WORDS + 1))
            return query.phrased(phrasing.TRAINED, rng, unknown)
        return templates.segmentation_question(query.text, query.is_sentence, rng)

    def _turn(self, query: Query, rng: np.random.Generator) -> tuple[str, str]:
        if not query.targets:
            return self._question(query, rng), ABSENT_ANSWER
        if self.answers == "explained":
            return self._question(query, rng), f"{join_segs(len(query.targets))}. {query.explanation}"
        if len(query.targets) == 1:
            answer = templates.segmentation_answer(rng)
        else:
            answer = templates.choose(MULTI_ANSWER_TEMPLATES, rng).format(segs=join_segs(len(query.targets)))
        if rng.random() < self.explanatory_rate:
            asked = query.text if query.is_sentence else f"Where is the {query.text}?"
            question = f"{asked} {templates.choose(templates.EXPLANATORY_QUESTION_SUFFIXES, rng)}"
            return question, f"{answer} {query.explanation}"
        return self._question(query, rng), answer

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        scene = self.scene(index)
        queries = self._draw_queries(scene.queries, rng, self.queries_per_image)
        conversations, masks = [], []
        for query in queries:
            conversations.append([self._turn(query, rng)])
            masks.extend(scene.masks[i].copy() for i in query.targets)
        meta = {
            "kinds": [q.kind for q in queries],
            "queries": [q.text for q in queries],
            "split": self.split,
            APPEARANCE_KEY: appearance_labels(scene.objects, scene.masks),
        }
        return Sample(scene.image, conversations, masks, self.name, meta)

    def eval_sample(self, index: int) -> Sample:
        """One query per scene, fixed by (seed, split, index), with the canonical answer, asked with the
        official evaluation question or, for `eval_phrasing` TRAINED / HELD_OUT, a phrasing of that set
        fixed by (seed, split, index, phrasing)."""
        scene = self.scene(index)
        query = self._draw_queries(scene.queries, scene.rng, 1)[0]
        if not query.targets:
            answer = ABSENT_ANSWER
        else:
            answer = f"{join_segs(len(query.targets))}."
        if self.eval_phrasing == phrasing.OFFICIAL:
            question = templates.eval_question(query.text, query.is_sentence)
        else:
            phrasing_rng = np.random.default_rng([self.seed, SPLITS[self.split], index, phrasing.PHRASINGS.index(self.eval_phrasing)])
            question = query.phrased(self.eval_phrasing, phrasing_rng)
        turn = (question, answer)
        meta = {
            "kind": query.kind,
            "query": query.text,
            "is_sentence": query.is_sentence,
            "phrasing": self.eval_phrasing,
            "split": self.split,
            "objects": [(o.colour, o.shape) for o in scene.objects],
        }
        return Sample(scene.image, [[turn]], [scene.masks[i].copy() for i in query.targets], self.name, meta)


# query generators: each returns every query of its kind that the scene makes unambiguous


def left_to_right(objects: list[SceneObject], indices) -> tuple[int, ...]:
    return tuple(sorted(indices, key=lambda i: (objects[i].centre[0], objects[i].centre[1])))


def unnamed_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour at least UNNAMED_COLOUR_DISTANCE from every named colour and every background grey."""
    named = np.array(list(COLOURS.values()), dtype=float)
    while True:
        rgb = rng.integers(0, 256, size=3)
        grey = np.clip(rgb.mean(), BACKGROUND_GREYS[0], BACKGROUND_GREYS[1] - 1)
        if (np.linalg.norm(named - rgb, axis=1).min() >= UNNAMED_COLOUR_DISTANCE
                and np.linalg.norm(rgb - grey) >= UNNAMED_COLOUR_DISTANCE):
            return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def object_name(colour: str, shape: str) -> str:
    """"red circle", or "circle" for a colour of no name (UNNAMED)."""
    return f"{colour} {shape}" if colour != UNNAMED else shape


def describe(obj: SceneObject) -> str:
    return object_name(obj.colour, obj.shape)


def phrase_slots(adjective: str, head: str = "") -> tuple[tuple[str, str], ...]:
    return (("adjective", adjective), ("head", head))


def predicate_slots(singular: str, plural_verb: str) -> tuple[tuple[str, str], ...]:
    return (("pred", singular), ("preds", plural_verb))


def attribute_queries(objects: list[SceneObject]) -> list[Query]:
    queries = []
    for index, obj in enumerate(objects):
        if obj.colour == UNNAMED:
            continue
        same_colour = [o for o in objects if o.colour == obj.colour]
        same_shape = [o for o in objects if o.shape == obj.shape]
        same_pair = [o for o in objects if o.pair == obj.pair]
        if len(same_colour) == 1:
            queries.append(
                Query("attribute", noun_phrase(obj.colour, ""), False, (index,),
                      f"The {describe(obj)} is the only {obj.colour} shape.", (index,),
                      slots=phrase_slots(obj.colour))
            )
        elif len(same_shape) > 1 and len(same_pair) == 1:
            queries.append(
                Query("attribute", describe(obj), False, (index,),
                      f"It is the only {obj.shape} that is {obj.colour}.", (index,),
                      slots=phrase_slots(obj.colour, obj.shape))
            )
    return queries


def _areas(masks: list[np.ndarray]) -> list[int]:
    return [int(mask.sum()) for mask in masks]


def unique_extreme(masks: list[np.ndarray], largest: bool) -> Optional[int]:
    areas = _areas(masks)
    order = sorted(range(len(areas)), key=lambda i: areas[i], reverse=largest)
    first, second = areas[order[0]], areas[order[1]]
    if largest and first >= SIZE_MARGIN * second or not largest and second >= SIZE_MARGIN * first:
        return order[0]
    return None


def size_queries(objects: list[SceneObject], masks: list[np.ndarray]) -> list[Query]:
    queries = []
    for largest, word, comparison in ((True, "largest", "larger"), (False, "smallest", "smaller")):
        index = unique_extreme(masks, largest)
        if index is not None:
            queries.append(
                Query("size", noun_phrase(word, ""), False, (index,),
                      f"The {describe(objects[index])} is {comparison} than every other shape.", (index,),
                      slots=phrase_slots(word))
            )
    return queries


def unique_references(objects: list[SceneObject], masks: list[np.ndarray]) -> list[tuple[int, str, str]]:
    """(object index, adjective, head) of objects that one noun phrase picks out (head "": the generic noun)."""
    references = []
    for largest, word in ((True, "largest"), (False, "smallest")):
        index = unique_extreme(masks, largest)
        if index is not None:
            references.append((index, word, ""))
    for index, obj in enumerate(objects):
        if obj.colour != UNNAMED and sum(o.colour == obj.colour for o in objects) == 1:
            references.append((index, obj.colour, ""))
        if sum(o.shape == obj.shape for o in objects) == 1:
            references.append((index, "", obj.shape))
    return references


def relation_queries(objects: list[SceneObject], masks: list[np.ndarray], short_side: int) -> list[Query]:
    gap = 0.05 * short_side
    queries = []
    for reference, ref_adjective, ref_head in unique_references(objects, masks):
        reference_text = noun_phrase(ref_adjective, ref_head)
        ref_x, ref_y = objects[reference].centre
        for relation, (dx, dy) in RELATIONS.items():
            matches = [
                i for i, o in enumerate(objects)
                if i != reference and (o.centre[0] - ref_x) * dx + (o.centre[1] - ref_y) * dy > gap
            ]
            if len(matches) == 1:
                target = matches[0]
                queries.append(
                    Query("relation", f"Which shape is {relation} the {reference_text}?", True, (target,),
                          f"The {describe(objects[target])} is the only shape {relation} the {reference_text}.",
                          (target, reference), form=RELATION,
                          slots=(("relation", relation), ("ref_adjective", ref_adjective), ("ref_head", ref_head)))
                )
    return queries


def function_queries(objects: list[SceneObject]) -> list[Query]:
    queries = []
    for shape, (singular, plural_verb, reason) in SHAPE_FUNCTIONS.items():
        matches = [i for i, o in enumerate(objects) if o.shape == shape]
        if len(matches) == 1:
            obj = objects[matches[0]]
            queries.append(
                Query("function", f"Which shape {singular}?", True, tuple(matches),
                      f"The {describe(obj)} {singular} because {reason}.", tuple(matches),
                      form=PREDICATE, slots=predicate_slots(singular, plural_verb))
            )
    for colour, (thing, verb) in COLOUR_KNOWLEDGE.items():
        matches = [i for i, o in enumerate(objects) if o.colour == colour]
        if len(matches) == 1:
            obj = objects[matches[0]]
            queries.append(
                Query("function", f"Which shape has the colour of {thing}?", True, tuple(matches),
                      f"The {describe(obj)} has the colour of {thing} because {thing} {verb} {colour}.",
                      tuple(matches), form=PREDICATE, slots=colour_predicate_slots(thing))
            )
    return queries


def colour_predicate_slots(thing: str) -> tuple[tuple[str, str], ...]:
    return predicate_slots(f"has the colour of {thing}", f"have the colour of {thing}")


def all_of_slots(adjective: str, head: str, count: int) -> tuple[tuple[str, str], ...]:
    return phrase_slots(adjective, head) + (("all", "both" if count == 2 else "all the"),)


def multiple_queries(objects: list[SceneObject]) -> list[Query]:
    queries = []
    for shape in SHAPES:
        matches = left_to_right(objects, [i for i, o in enumerate(objects) if o.shape == shape])
        if len(matches) >= 2:
            count = NUMBER_WORDS[len(matches)]
            text = f"Find both {plural(shape)}." if len(matches) == 2 else f"Find all the {plural(shape)}."
            queries.append(Query("multiple", text, True, matches, f"There are {count} {plural(shape)}.", matches,
                                 form=ALL_OF, slots=all_of_slots("", shape, len(matches))))
            singular, plural_verb, _ = SHAPE_FUNCTIONS[shape]
            queries.append(
                Query("multiple", f"Which shapes {plural_verb}?", True, matches,
                      f"There are {count} {plural(shape)} and each {singular}.", matches,
                      form=PLURAL_PREDICATE, slots=predicate_slots(singular, plural_verb))
            )
    for colour in COLOURS:
        matches = left_to_right(objects, [i for i, o in enumerate(objects) if o.colour == colour])
        if len(matches) >= 2:
            count = NUMBER_WORDS[len(matches)]
            queries.append(
                Query("multiple", f"Find all the {colour} shapes.", True, matches,
                      f"There are {count} {colour} shapes.", matches,
                      form=ALL_OF, slots=all_of_slots(colour, "", len(matches)))
            )
    return queries


def absent_queries(objects: list[SceneObject]) -> list[Query]:
    present_pairs = {o.pair for o in objects}
    present_colours = {o.colour for o in objects}
    present_shapes = {o.shape for o in objects}
    queries = []
    # Pairs one half of which is in the scene: the model must check both attributes.
    for colour, shape in itertools.product(COLOURS, SHAPES):
        if (colour, shape) not in present_pairs and (colour in present_colours or shape in present_shapes):
            queries.append(Query("absent", f"{colour} {shape}", False, (), "", (), (colour, shape),
                                 slots=phrase_slots(colour, shape)))
    for shape, (singular, plural_verb, _) in SHAPE_FUNCTIONS.items():
        if shape not in present_shapes:
            queries.append(Query("absent", f"Which shape {singular}?", True, (), "", (),
                                 form=PREDICATE, slots=predicate_slots(singular, plural_verb)))
    for colour, (thing, _) in COLOUR_KNOWLEDGE.items():
        if colour not in present_colours:
            queries.append(Query("absent", f"Which shape has the colour of {thing}?", True, (), "", (),
                                 form=PREDICATE, slots=colour_predicate_slots(thing)))
    return queries


@functools.lru_cache(maxsize=1)
def explanations() -> frozenset[str]:
    """Every explanation the generator can write after an answer's [SEG]s."""
    texts = set()
    references = ["largest shape", "smallest shape", *(f"{c} shape" for c in COLOURS), *SHAPES]
    for shape in SHAPES:
        singular, _, reason = SHAPE_FUNCTIONS[shape]
        for colour in (UNNAMED, *COLOURS):
            described = object_name(colour, shape)
            texts.update({
                f"The {described} is larger than every other shape.",
                f"The {described} is smaller than every other shape.",
                f"The {described} {singular} because {reason}.",
            })
            texts.update(f"The {described} is the only shape {relation} the {reference}."
                         for relation, reference in itertools.product(RELATIONS, references))
            if colour == UNNAMED:
                continue
            thing, verb = COLOUR_KNOWLEDGE[colour]
            texts.update({
                f"The {described} is the only {colour} shape.",
                f"It is the only {shape} that is {colour}.",
                f"The {described} has the colour of {thing} because {thing} {verb} {colour}.",
            })
    for count in NUMBER_WORDS.values():
        for shape, (singular, _, _) in SHAPE_FUNCTIONS.items():
            texts.update({f"There are {count} {plural(shape)}.", f"There are {count} {plural(shape)} and each {singular}."})
        texts.update(f"There are {count} {colour} shapes." for colour in COLOURS)
    return frozenset(texts)


def is_well_formed(answer: str, masks: int) -> bool:
    """Whether `answer` is a sentence the generator can write with exactly `masks` [SEG]s: ABSENT_ANSWER
    for none; else an answer template or the bare "[SEG]." form with that many [SEG]s, alone or followed
    by one explanation."""
    answer = answer.strip()
    if answer.count(SEG_TOKEN) != masks:
        return False
    if masks == 0:
        return answer == ABSENT_ANSWER
    segs = join_segs(masks)
    heads = [f"{segs}."] + [template.format(segs=segs) for template in MULTI_ANSWER_TEMPLATES]
    if masks == 1:
        heads += list(templates.ANSWER_TEMPLATES)
    return any(answer == head or answer.startswith(head + " ") and answer[len(head) + 1:] in explanations()
               for head in heads)


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word of `corpus()`, lowercase: what a made-up word must never be."""
    return frozenset(phrasing.words(corpus()))


def corpus() -> list[str]:
    """Sentences covering every word the benchmark emits (questions in LISA's templates and the TRAINED
    phrasings, answers, explanations); never the held-out phrasings."""
    sentences = list(templates.template_corpus()) + phrasing.corpus()
    sentences += list(MULTI_ANSWER_TEMPLATES) + [ABSENT_ANSWER, join_segs(3) + "."]
    sentences.append(" ".join(NUMBER_WORDS.values()))
    colours, shapes = list(COLOURS), list(SHAPES)
    sentences.append("Where is the")
    for colour in colours:
        sentences.append(f"{colour} shape. Find all the {colour} shapes.")
        sentences.append(f"It is the only {colour} shape.")
    for colour, shape in itertools.product(colours, shapes):
        sentences.append(f"The {colour} {shape} is the only {colour} shape.")
        sentences.append(f"It is the only {shape} that is {colour}.")
    sentences.append("largest shape smallest shape larger smaller than every other shape.")
    for relation in RELATIONS:
        sentences.append(f"Which shape is {relation} the? The is the only shape {relation} the.")
    for shape, (singular, plural_verb, reason) in SHAPE_FUNCTIONS.items():
        sentences.append(f"Which shape {singular}? Which shapes {plural_verb}? because {reason}.")
        sentences.append(f"Find both {plural(shape)}. Find all the {plural(shape)}. There are {plural(shape)} and each.")
    for colour, (thing, verb) in COLOUR_KNOWLEDGE.items():
        sentences.append(f"Which shape has the colour of {thing}? because {thing} {verb} {colour}.")
    return sentences
