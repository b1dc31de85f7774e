"""A small English-like corpus that effdist generates itself, so a fresh checkout trains with no downloads.

Documents are short stories assembled from templated sentences over a fixed word list. The text is
deliberately regular: each story keeps one protagonist, one animal and one place, sentences follow a
handful of patterns, and some patterns are fully predictable (counting, the order of days and
months). A tiny model therefore has plenty to learn quickly (frequent words, then the templates, then
copying names from earlier in the document), which is what makes its loss fall visibly within a few
dozen steps. The same (num_documents, seed) always gives byte-identical output.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

# Bump when the generator's output changes, so cached corpora built by an older version are rebuilt.
GENERATOR_VERSION = 1

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lucy", "Max",
         "Nora", "Oscar", "Paul", "Rosa", "Sam", "Tara"]
# (singular, plural)
ANIMALS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("horse", "horses"), ("rabbit", "rabbits"),
           ("fox", "foxes"), ("goat", "goats"), ("duck", "ducks"), ("sheep", "sheep"), ("mouse", "mice"),
           ("frog", "frogs"), ("owl", "owls"), ("bear", "bears"), ("cow", "cows"), ("pig", "pigs")]
OBJECTS = [("apple", "apples"), ("book", "books"), ("cup", "cups"), ("ball", "balls"), ("hat", "hats"),
           ("box", "boxes"), ("key", "keys"), ("coin", "coins"), ("lamp", "lamps"), ("shoe", "shoes"),
           ("basket", "baskets"), ("letter", "letters"), ("flower", "flowers"), ("stone", "stones"),
           ("bottle", "bottles"), ("pencil", "pencils"), ("cake", "cakes"), ("rope", "ropes")]
PLACES = ["garden", "forest", "river", "market", "school", "kitchen", "library", "farm", "park", "village",
          "station", "beach", "hill", "bridge"]
ADJECTIVES = ["small", "big", "old", "young", "happy", "quiet", "brave", "clever", "tired", "hungry", "kind",
              "lazy", "curious", "gentle", "funny", "shy"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "grey"]
VERBS = ["found", "carried", "watched", "followed", "painted", "dropped", "opened", "cleaned", "hid", "pushed",
         "lifted", "counted", "shared", "lost", "kept"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy"]


class _Story:
    """The cast of one document: sentences refer back to it, so later tokens depend on earlier ones."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.hero, self.friend = rng.sample(NAMES, 2)
        self.animal, self.animals = rng.choice(ANIMALS)
        self.place = rng.choice(PLACES)
        self.adjective = rng.choice(ADJECTIVES)
        self.color = rng.choice(COLORS)

    def sentence(self) -> str:
        r = self.rng
        obj, objs = r.choice(OBJECTS)
        n = r.randrange(2, len(NUMBERS))
        kind = r.randrange(10)
        if kind == 0:
            return f"{self.hero} saw a {self.adjective} {self.animal} near the {self.place}."
        if kind == 1:
            return f"The {self.animal} {r.choice(VERBS)} the {r.choice(COLORS)} {obj}."
        if kind == 2:
            day = r.choice(DAYS)
            return f"On {day}, {self.hero} went to the {self.place} with {NUMBERS[n]} {objs}."
        if kind == 3:
            return (f"{self.hero} has {NUMBERS[n]} {objs} and {self.friend} has {NUMBERS[n - 1]} {objs}, "
                    f"so {self.hero} has one more.")
        if kind == 4:
            start = r.randrange(0, len(NUMBERS) - 4)
            run = NUMBERS[start:start + r.randrange(3, 6)]
            return f"The {self.animal} counted: " + ", ".join(run) + "."
        if kind == 5:
            i = r.randrange(len(DAYS))
            return f"After {DAYS[i]} comes {DAYS[(i + 1) % len(DAYS)]}."
        if kind == 6:
            i = r.randrange(len(MONTHS))
            return f"After {MONTHS[i]} comes {MONTHS[(i + 1) % len(MONTHS)]}."
        if kind == 7:
            return (f"\"Where is the {obj}?\" asked {self.hero}. "
                    f"\"It is in the {self.place},\" said {self.friend}.")
        if kind == 8:
            return f"The weather was {r.choice(WEATHER)}, and the {self.animal} was {r.choice(ADJECTIVES)}."
        return f"{self.friend} gave {self.hero} a {self.color} {obj}."

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randrange(3, 7)))


def generate_documents(num_documents: int, seed: int = 0) -> Iterator[str]:
    """Yield `num_documents` stories; the same arguments always yield the same text."""
    if num_documents < 1:
        raise ValueError(f"num_documents = {num_documents}: the sample corpus needs at least one document")
    rng = random.Random(seed)
    for index in range(num_documents):
        story = _Story(rng)
        title = f"Story {index + 1}: {story.hero} and the {story.adjective} {story.animal}"
        paragraphs = [story.paragraph() for _ in range(rng.randrange(1, 4))]
        ending = f"The end of the story about {story.hero} and the {story.animal}."
        yield "\n\n".join([title, *paragraphs, ending])


def write_sample_corpus(path: str | os.PathLike, num_documents: int, seed: int = 0) -> Path:
    """Write the corpus as JSON lines with a "text" field (what `effdist preprocess` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in generate_documents(num_documents, seed):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path
