"""A small controlled multilingual world: one source language, target languages derived from it.

Every sentence expresses a *meaning*: someone (a name) does an action (a verb) to an object, with
an optional adjective, an optional time word, and a grammatical number (one or many). Verbs and
objects belong to one of four topics (food, travel, study, music), and a second kind of sentence
says that someone likes a topic. The same meaning can be rendered in every language:

* ``src`` (the source, English-like): subject-verb-object, determiner ``the``/``many`` before the
  noun, adjective before the noun;
* ``tgA``: its own vocabulary (generated pseudo-words), subject-object-verb order, adjective after
  the noun, no determiner, plural as a noun suffix (a different word form);
* ``tgB``: another vocabulary, verb-subject-object order, an object-case particle after the
  object, plural as a particle before the noun.

Half of the action sentences in the unlabelled text are followed by "<subject> likes <topic> .",
so the text says which topic an action belongs to (world knowledge, present in every language).
Names and punctuation are shared by all languages (as names and digits are in real languages);
everything else differs. The labelled task is topic classification: ``<sentence> <topic-word> :``
is answered by the topic in the same language; the task has labels only in the source language
(plus held-out target-language labels for the oracle adapter and the evaluation).

Everything is generated from a seed, so the world, its text and its task data are identical on
every run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

NAMES: tuple[str, ...] = ("ana", "bo", "kim", "lena", "omar", "pia", "raj", "sam", "tess", "yuri", "zoe", "ivan")
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "food": (("eat", "cook", "buy"), ("bread", "apple", "soup", "rice", "cake")),
    "travel": (("drive", "ride", "steer"), ("car", "bike", "bus", "boat", "train")),
    "study": (("read", "write", "copy"), ("book", "letter", "poem", "note", "map")),
    "music": (("sing", "play", "hum"), ("song", "drum", "tune", "flute", "piano")),
}
ADJECTIVES: tuple[str, ...] = ("red", "big", "old", "new", "small", "green")
TIMES: tuple[str, ...] = ("today", "yesterday", "often")
FUNCTION_WORDS: tuple[str, ...] = ("the", "many", "likes", "topic")
PUNCTUATION: tuple[str, ...] = (".", ":")


def concepts() -> list[str]:
    """Every concept of the world that a language names with its own word (names excluded)."""
    words = list(TOPICS)
    for verbs, objects in TOPICS.values():
        words += list(verbs) + list(objects)
    return words + list(ADJECTIVES) + list(TIMES) + list(FUNCTION_WORDS)


@dataclass(frozen=True)
class Meaning:
    """What a sentence says, independently of the language."""

    subject: str
    verb: str
    obj: str
    adjective: str | None = None
    time: str | None = None
    plural: bool = False
    topic_only: bool = False  # "<subject> likes <topic>" (obj holds the topic)

    @property
    def topic(self) -> str:
        if self.topic_only:
            return self.obj
        return next(t for t, (verbs, _objs) in TOPICS.items() if self.verb in verbs)


@dataclass(frozen=True)
class Language:
    """How one language renders meanings."""

    code: str
    lexicon: dict[str, str]
    order: str  # "SVO", "SOV" or "VSO"
    adjective_after_noun: bool = False
    determiners: bool = True  # "the"/"many" before the noun
    plural_suffix: str | None = None  # plural as a new word form: noun + suffix
    plural_particle: str | None = None  # plural as a particle before the noun
    object_particle: str | None = None  # case particle after the object noun phrase
    extra_words: tuple[str, ...] = field(default_factory=tuple)

    def word(self, concept: str) -> str:
        return self.lexicon[concept]

    def noun_phrase(self, meaning: Meaning) -> list[str]:
        noun = self.word(meaning.obj)
        if meaning.plural and self.plural_suffix:
            noun = noun + self.plural_suffix
        phrase = [noun]
        if meaning.adjective:
            adj = self.word(meaning.adjective)
            phrase = phrase + [adj] if self.adjective_after_noun else [adj] + phrase
        if meaning.plural and self.plural_particle:
            phrase = [self.plural_particle] + phrase
        if self.determiners:
            phrase = [self.word("many" if meaning.plural else "the")] + phrase
        if self.object_particle:
            phrase = phrase + [self.object_particle]
        return phrase

    def render(self, meaning: Meaning) -> str:
        """The sentence for ``meaning`` in this language (words separated by spaces, ending in '.')."""
        subject = [meaning.subject]
        if meaning.topic_only:
            verb = [self.word("likes")]
            obj = [self.word(meaning.obj)] + ([self.object_particle] if self.object_particle else [])
        else:
            verb = [self.word(meaning.verb)]
            obj = self.noun_phrase(meaning)
        parts = {"S": subject, "V": verb, "O": obj}
        words = [w for slot in self.order for w in parts[slot]]
        if meaning.time:
            words = [self.word(meaning.time)] + words
        return " ".join(words + ["."])

    def task_prompt(self, meaning: Meaning) -> str:
        """The classification prompt: the sentence, then this language's word for 'topic', then ':'."""
        return f"{self.render(meaning)} {self.word('topic')} :"

    def topic_words(self) -> list[str]:
        return [self.word(t) for t in TOPICS]

    def vocabulary(self) -> set[str]:
        words = set(self.lexicon.values()) | set(NAMES) | set(PUNCTUATION) | set(self.extra_words)
        if self.plural_suffix:
            words |= {self.word(o) + self.plural_suffix for _v, objs in TOPICS.values() for o in objs}
        for particle in (self.plural_particle, self.object_particle):
            if particle:
                words.add(particle)
        return words


def _pseudo_words(rng: random.Random, n: int, consonants: str, vowels: str, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def build_languages(num_targets: int = 2, seed: int = 0) -> list[Language]:
    """The source language ``src`` and ``num_targets`` (1 to 4) target languages derived from it."""
    if not 1 <= num_targets <= 4:
        raise ValueError(f"num_targets must be between 1 and 4, got {num_targets}")
    rng = random.Random(seed)
    items = concepts()
    taken = set(items) | set(NAMES)
    src = Language(code="src", lexicon={c: c for c in items}, order="SVO")
    # Each target differs from the source in vocabulary, word order and morphology.
    designs = [
        dict(
            code="tgA",
            letters=("ptkmnsl", "aiou"),
            order="SOV",
            adjective_after_noun=True,
            determiners=False,
            plural_suffix="ru",
        ),
        dict(
            code="tgB",
            letters=("bdgvzr", "eiouy"),
            order="VSO",
            determiners=False,
            plural_particle=True,
            object_particle=True,
        ),
        dict(code="tgC", letters=("fhjwxc", "aeoy"), order="SOV", determiners=True, object_particle=True),
        dict(
            code="tgD",
            letters=("qtdnrv", "aeiu"),
            order="VSO",
            adjective_after_noun=True,
            determiners=False,
            plural_suffix="en",
        ),
    ]
    languages = [src]
    for design in designs[:num_targets]:
        consonants, vowels = design["letters"]
        words = _pseudo_words(rng, len(items) + 2, consonants, vowels, taken)
        lexicon = dict(zip(items, words))
        plural_particle = words[-2] if design.get("plural_particle") else None
        object_particle = words[-1] if design.get("object_particle") else None
        languages.append(
            Language(
                code=design["code"],
                lexicon=lexicon,
                order=design["order"],
                adjective_after_noun=design.get("adjective_after_noun", False),
                determiners=design.get("determiners", True),
                plural_suffix=design.get("plural_suffix"),
                plural_particle=plural_particle,
                object_particle=object_particle,
            )
        )
    return languages


def sample_meanings(n: int, seed: int, topic_sentence_rate: float = 0.15) -> Iterator[Meaning]:
    """``n`` random meanings (a fixed sequence for a given seed)."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    for _ in range(n):
        subject = rng.choice(NAMES)
        if rng.random() < topic_sentence_rate:
            yield Meaning(subject=subject, verb="likes", obj=rng.choice(topics), topic_only=True)
            continue
        topic = rng.choice(topics)
        verbs, objects = TOPICS[topic]
        yield Meaning(
            subject=subject,
            verb=rng.choice(verbs),
            obj=rng.choice(objects),
            adjective=rng.choice(ADJECTIVES) if rng.random() < 0.5 else None,
            time=rng.choice(TIMES) if rng.random() < 0.3 else None,
            plural=rng.random() < 0.3,
        )


def unlabelled_text(language: Language, n_lines: int, seed: int, follow_up_rate: float = 0.5) -> list[str]:
    """Plain text in ``language`` (the pretraining and reference-task text), one line per item.

    With probability ``follow_up_rate`` an action sentence is followed by "<subject> likes
    <topic> ." for the action's topic: the text itself says which topic each action belongs to,
    as real text carries world knowledge, in every language alike.
    """
    rng = random.Random(seed + 1)
    lines = []
    for meaning in sample_meanings(n_lines, seed):
        line = language.render(meaning)
        if not meaning.topic_only and rng.random() < follow_up_rate:
            follow = Meaning(subject=meaning.subject, verb="likes", obj=meaning.topic, topic_only=True)
            line = f"{line} {language.render(follow)}"
        lines.append(line)
    return lines


def task_examples(language: Language, n: int, seed: int) -> list[dict]:
    """Topic-classification examples: ``prompt``, ``completion`` (" <topic>"), ``choices``, ``label``.

    Only action sentences are used (a "likes <topic>" sentence would name its own answer).
    """
    choices = language.topic_words()
    rng = random.Random(seed)
    out = []
    for meaning in sample_meanings(n * 3, rng.randrange(1 << 30), topic_sentence_rate=0.0):
        if len(out) == n:
            break
        label = list(TOPICS).index(meaning.topic)
        out.append(
            {
                "prompt": language.task_prompt(meaning),
                "completion": " " + choices[label],
                "choices": choices,
                "label": label,
            }
        )
    return out
