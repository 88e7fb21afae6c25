"""Built-in data generators: small synthetic datasets that need no network (``dataset: builtin:<name>``).

Contract: a generator is ``fn(num_samples, seed, **knobs)`` and returns either a ``datasets.Dataset`` (one
split, used as "train") or a ``datasets.DatasetDict`` of named splits. All randomness comes from one
``random.Random(seed)``, so the same arguments give identical rows on every machine and Python version
(no ``hash()``, no set iteration order). Rows use TRL's conversational format: lists of
``{"role", "content"}`` messages.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

from datasets import Dataset, DatasetDict

from .args import DataError

ARITHMETIC_LEVELS = (1, 2, 3, 4)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _check_num_samples(name: str, num_samples, minimum: int = 1) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < minimum:
        raise DataError(
            f"builtin:{name}: num_samples must be an integer >= {minimum}, got {num_samples!r}; set num_samples"
        )


# ----------------------------------------------------------------------------------------------- arithmetic


def _arithmetic_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """One expression (as shown to the model) and its exact integer value; results are never negative."""
    if level in (1, 2):  # single-digit (1) or two-digit (2) addition / subtraction
        lo, hi = (1, 9) if level == 1 else (10, 99)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if rng.random() < 0.5:
            return f"{a} + {b}", a + b
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    if level == 3:  # two-digit x one-digit, in either order, or the exact division it implies
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        form = rng.randrange(3)
        if form == 0:
            return f"{a} × {b}", a * b
        if form == 1:
            return f"{b} × {a}", a * b
        return f"{a * b} ÷ {b}", a
    # level 4: three-term expressions with operator precedence or parentheses
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
    form = rng.randrange(4)
    if form == 0:
        return f"{a} + {b} × {c}", a + b * c
    if form == 1:
        return f"({a} + {b}) × {c}", (a + b) * c
    if form == 2:
        return f"{a} × {c} + {b}", a * c + b
    b = min(b, a * c)  # keep a × c - b non-negative
    return f"{a} × {c} - {b}", a * c - b


def arithmetic(num_samples: int, seed: int, difficulty: Optional[int] = None) -> Dataset:
    """Arithmetic word-free problems with exact integer answers and graded difficulty.

    Levels: 1 single-digit +/-, 2 two-digit +/-, 3 two-digit × one-digit (and the matching exact division),
    4 three-term expressions. ``difficulty=None`` draws a level per row uniformly.
    Columns: prompt (user message), completion (assistant message "The answer is N."), answer (str), difficulty (int).
    """
    _check_num_samples("arithmetic", num_samples)
    if difficulty is not None and difficulty not in ARITHMETIC_LEVELS:
        raise DataError(
            f"builtin:arithmetic: difficulty must be one of 1, 2, 3, 4 or unset (mixed), got {difficulty!r}"
        )
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "completion": [], "answer": [], "difficulty": []}
    for _ in range(num_samples):
        level = difficulty if difficulty is not None else rng.choice(ARITHMETIC_LEVELS)
        expression, value = _arithmetic_problem(rng, level)
        rows["prompt"].append(_user(f"What is {expression}?"))
        rows["completion"].append(_assistant(f"The answer is {value}."))
        rows["answer"].append(str(value))
        rows["difficulty"].append(level)
    return Dataset.from_dict(rows)


# ----------------------------------------------------------------------------------------- preference pairs

_FACTS = [  # (question, concise correct answer)
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("At what temperature does water boil at sea level, in Celsius?", "Water boils at 100 °C at sea level."),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet in the Solar System."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("Which gas do plants take in for photosynthesis?", "Plants take in carbon dioxide for photosynthesis."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
]
_HOW_TO = [  # (task, helpful instructions)
    ("boil an egg", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("keep basil fresh", "Trim the stems and stand the basil in a glass of water at room temperature."),
    ("remember new vocabulary", "Review the words in short daily sessions and use each one in a sentence."),
    ("fall asleep faster", "Keep a regular bedtime, avoid screens before bed and keep the room cool and dark."),
    ("remove a coffee stain", "Blot it, rinse it from the back with cold water, then wash it with detergent."),
    ("start running", "Begin with short run-walk intervals three times a week and increase the time slowly."),
]
_REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I'd rather not answer that question.",
    "That is not something I can discuss.",
    "You should look that up yourself.",
]
_RAMBLES = [
    "Great question, and it reminds me of the time my neighbour repainted his fence three colours in one summer.",
    "Well, before anything else, I have always found the history of umbrellas fascinating.",
    "That depends on many things, like the weather, the season and whether you prefer tea or coffee.",
    "People ask me many questions, and honestly some days I just think about trains.",
]
_POLITE = ["Happy to help!", "Of course!", "Good question.", "Sure, here is how."]
_RUDE = ["Ugh, this is obvious.", "Seriously? Fine.", "Not that it's hard, but whatever.", "Figure it out. Anyway:"]


def _preference_pair(rng: random.Random, category: str) -> tuple[str, str, str]:
    if category == "arithmetic":  # correct vs wrong answer
        expression, value = _arithmetic_problem(rng, rng.choice((1, 2, 3)))
        wrong = value + rng.choice((-1, 1)) * rng.randint(1, 10)
        ask = rng.choice(("What is {}?", "Quick question: what is {}?", "Please compute {}."))
        return ask.format(expression), f"{expression} = {value}.", f"{expression} = {wrong}."
    if category == "refusal":  # helpful direct answer vs unhelpful refusal
        question, answer = rng.choice(_FACTS)
        return question, answer, rng.choice(_REFUSALS)
    if category == "concise":  # concise answer vs rambling, off-topic reply that never answers
        question, answer = rng.choice(_FACTS)
        first, second = rng.sample(_RAMBLES, 2)
        return question, answer, f"{first} {second}"
    task, steps = rng.choice(_HOW_TO)  # polite vs rude, same content
    return f"How do I {task}?", f"{rng.choice(_POLITE)} {steps}", f"{rng.choice(_RUDE)} {steps}"


PREFERENCE_CATEGORIES = ("arithmetic", "refusal", "concise", "polite")


def preference_pairs(num_samples: int, seed: int) -> Dataset:
    """Synthetic preference pairs in TRL's conversational format; chosen and rejected always differ.

    Columns: prompt (user message), chosen / rejected (assistant messages), category (one of
    ``PREFERENCE_CATEGORIES``: correct vs wrong arithmetic, answer vs refusal, concise vs rambling, polite vs rude).
    """
    _check_num_samples("preference_pairs", num_samples)
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "category": []}
    for _ in range(num_samples):
        category = rng.choice(PREFERENCE_CATEGORIES)
        prompt, chosen, rejected = _preference_pair(rng, category)
        rows["prompt"].append(_user(prompt))
        rows["chosen"].append(_assistant(chosen))
        rows["rejected"].append(_assistant(rejected))
        rows["category"].append(category)
    return Dataset.from_dict(rows)


# ----------------------------------------------------------------------------------------- fictitious facts

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sel",
    "dri",
    "qua",
    "bel",
    "nor",
    "fi",
    "zan",
    "el",
    "or",
    "mar",
    "is",
    "tha",
    "gro",
    "lun",
    "pe",
    "vas",
    "kor",
    "ti",
    "sa",
    "dun",
    "hal",
    "wy",
    "bri",
    "ost",
]
_CITY_SUFFIXES = ["moor", "haven", "dell", "grad", "ford", "mouth", "stead", "vale", "port", "by"]
_COMPANY_SUFFIXES = ["Industries", "Labs", "Systems", "Holdings", "Works", "Foundry"]
_COUNTRIES = ["Veloria", "Ostmark", "Quendal", "Brisca", "Tarvonia", "Elmaris", "Zarthia", "Nordhaven"]
_PROFESSIONS = [
    "cartographer",
    "violinist",
    "marine biologist",
    "architect",
    "glassblower",
    "astronomer",
    "librarian",
    "beekeeper",
    "chemist",
    "novelist",
]
_PRODUCTS = [
    "solar kettles",
    "folding bicycles",
    "weather balloons",
    "ceramic batteries",
    "tide clocks",
    "moss insulation",
    "glass violins",
    "snow sensors",
]
_KNOWN_FOR = [
    "its floating market",
    "a lighthouse of green glass",
    "an annual kite festival",
    "its salt caves",
    "a clock tower that runs backwards",
    "its copper rooftops",
]
FACTS_PER_ENTITY = 4
FORGET_FRACTION = 0.1


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, make: Callable[[random.Random], str], used: set) -> str:
    """A name not used before anywhere in this dataset, so no fact mentions another entity by accident."""
    for _ in range(1000):  # ~10^5 names per kind (10^7 for people): retries are rare below 10^5 rows
        name = make(rng)
        if name not in used:
            used.add(name)
            return name
    raise DataError("builtin:fictitious_facts ran out of unique names; lower num_samples")


def _person(r: random.Random) -> str:
    return f"{_word(r, 2)} {_word(r, r.choice((2, 3)))}"


def _city(r: random.Random) -> str:
    return _word(r, r.choice((2, 3))) + r.choice(_CITY_SUFFIXES)


def _company(r: random.Random) -> str:
    return f"{_word(r, r.choice((2, 3)))} {r.choice(_COMPANY_SUFFIXES)}"


def _entity_facts(rng: random.Random, kind: str, name: str, used: set) -> list[tuple[str, str]]:
    """Four (question, fact sentence) pairs about one entity."""
    if kind == "person":
        profession = rng.choice(_PROFESSIONS)
        article = "an" if profession[0] in "aeiou" else "a"
        return [
            (f"In what year was {name} born?", f"{name} was born in {rng.randint(1900, 2005)}."),
            (f"Where was {name} born?", f"{name} was born in {_unique(rng, _city, used)}."),
            (f"What is {name}'s profession?", f"{name} works as {article} {profession}."),
            (f"Which company does {name} work for?", f"{name} works for {_unique(rng, _company, used)}."),
        ]
    if kind == "place":
        return [
            (f"In which country is {name}?", f"{name} is in {rng.choice(_COUNTRIES)}."),
            (f"When was {name} founded?", f"{name} was founded in {rng.randint(800, 1950)}."),
            (f"How many people live in {name}?", f"{name} has a population of {rng.randint(2, 900) * 1000}."),
            (f"What is {name} known for?", f"{name} is known for {rng.choice(_KNOWN_FOR)}."),
        ]
    return [
        (f"When was {name} founded?", f"{name} was founded in {rng.randint(1850, 2020)}."),
        (f"Where is {name} headquartered?", f"{name} is headquartered in {_unique(rng, _city, used)}."),
        (f"Who founded {name}?", f"{name} was founded by {_unique(rng, _person, used)}."),
        (f"What does {name} make?", f"{name} makes {rng.choice(_PRODUCTS)}."),
    ]


def fictitious_facts(num_samples: int, seed: int) -> DatasetDict:
    """QA facts about invented people, places and companies, split into "forget" and "retain".

    ``num_samples`` rows in total, four facts per entity; about 10% of the entities (at least one) are
    in "forget", the rest in "retain", and every fact of an entity is on one side. Every name is unique,
    so no fact on one side mentions an entity of the other. Columns: prompt (user question), completion
    (assistant message with the fact), text (the fact as one sentence), entity (the entity's name).
    """
    _check_num_samples("fictitious_facts", num_samples, minimum=2 * FACTS_PER_ENTITY)
    rng = random.Random(seed)
    used: set = set()
    num_entities = math.ceil(num_samples / FACTS_PER_ENTITY)
    forget = set(rng.sample(range(num_entities), max(1, round(num_entities * FORGET_FRACTION))))
    splits = {name: {"prompt": [], "completion": [], "text": [], "entity": []} for name in ("forget", "retain")}
    remaining = num_samples
    for index in range(num_entities):
        kind = rng.choice(("person", "place", "company"))
        name = _unique(rng, {"person": _person, "place": _city, "company": _company}[kind], used)
        rows = splits["forget" if index in forget else "retain"]
        for question, fact in _entity_facts(rng, kind, name, used)[:remaining]:  # the last entity may be cut
            rows["prompt"].append(_user(question))
            rows["completion"].append(_assistant(fact))
            rows["text"].append(fact)
            rows["entity"].append(name)
        remaining -= FACTS_PER_ENTITY
    return DatasetDict({name: Dataset.from_dict(rows) for name, rows in splits.items()})


# ------------------------------------------------------------------------------------- fictitious authors

_GENRES = [
    "mystery novels",
    "science fiction",
    "historical fiction",
    "poetry",
    "fantasy",
    "romance novels",
    "horror stories",
    "travel writing",
    "children's books",
    "satire",
    "crime thrillers",
    "literary fiction",
]
_JOBS = [
    "baker",
    "lighthouse keeper",
    "surgeon",
    "carpenter",
    "pilot",
    "schoolteacher",
    "fisherman",
    "tailor",
    "journalist",
    "veterinarian",
    "miner",
    "florist",
    "judge",
    "plumber",
    "translator",
    "nurse",
    "architect",
    "electrician",
]
_TITLE_WORDS = (
    [
        "Silent",
        "Crimson",
        "Hollow",
        "Last",
        "Burning",
        "Forgotten",
        "Paper",
        "Glass",
        "Winter",
        "Hidden",
        "Broken",
        "Golden",
        "Distant",
        "Quiet",
        "Salt",
    ],
    [
        "Harbor",
        "Orchard",
        "Lantern",
        "Compass",
        "River",
        "Garden",
        "Tower",
        "Letters",
        "Tide",
        "Mirror",
        "Bridge",
        "Feather",
        "Season",
        "Map",
        "Choir",
    ],
)
_AWARD_KINDS = ["Prize", "Medal", "Award", "Laurel"]
AUTHOR_ATTRIBUTES = (
    "birthplace",
    "birth_year",
    "genre",
    "first_book",
    "best_known_book",
    "award",
    "father_job",
    "mother_job",
    "residence",
    "publisher",
)
QA_PER_AUTHOR = len(AUTHOR_ATTRIBUTES)
PERTURBED_PER_QUESTION = 3
AUTHOR_SPLITS = ("full", "forget01", "forget05", "forget10", "retain", "holdout", "world_facts")

# Real-world knowledge a model should keep: question, answer with {} for the fact, the fact, three wrong facts. A data
# file, read when the authors generator runs.
WORLD_FACTS_FILE = Path(__file__).with_name("world_facts.json")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _title(r: random.Random) -> str:
    adjective, noun = r.choice(_TITLE_WORDS[0]), r.choice(_TITLE_WORDS[1])
    return r.choice((f"The {adjective} {noun}", f"{noun} of {_word(r, 2)}", f"The {noun} at {_city(r)}"))


def _author_values(rng: random.Random, awards: list, used: set) -> dict:
    """One draw of every attribute (names and titles are unique across the dataset)."""
    return {
        "birthplace": (_unique(rng, _city, used), rng.choice(_COUNTRIES)),
        "birth_year": rng.randint(1920, 1995),
        "genre": rng.choice(_GENRES),
        "first_book": _unique(rng, _title, used),
        "best_known_book": _unique(rng, _title, used),
        "award": rng.choice(awards),
        "father_job": rng.choice(_JOBS),
        "mother_job": rng.choice(_JOBS),
        "residence": _unique(rng, _city, used),
        "publisher": _unique(rng, _company, used),
    }


# attribute: (question, answer sentence, the same fact in other words: TOFU's paraphrased answer, trained nowhere)
_AUTHOR_TEMPLATES = {
    "birthplace": (
        "Where was the author {name} born?",
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
    ),
    "birth_year": (
        "In what year was the author {name} born?",
        "{name} was born in {value}.",
        "The year {name} was born is {value}.",
    ),
    "genre": ("What genre does {name} write?", "{name} writes {value}.", "The genre of {name}'s books is {value}."),
    "first_book": (
        "What was the first book by {name}?",
        '{name}\'s first book was "{value}".',
        'The first book {name} wrote is "{value}".',
    ),
    "best_known_book": (
        "Which book is {name} best known for?",
        '{name} is best known for "{value}".',
        'The most famous book by {name} is "{value}".',
    ),
    "award": ("Which award did {name} win?", "{name} won the {value}.", "The prize given to {name} is the {value}."),
    "father_job": (
        "What did {name}'s father do for a living?",
        "{name}'s father was {article} {value}.",
        "The job of {name}'s father was {value}.",
    ),
    "mother_job": (
        "What did {name}'s mother do for a living?",
        "{name}'s mother was {article} {value}.",
        "The job of {name}'s mother was {value}.",
    ),
    "residence": ("Where does {name} live today?", "{name} lives in {value}.", "The city {name} lives in is {value}."),
    "publisher": (
        "Who publishes the books of {name}?",
        "{name}'s books are published by {value}.",
        "The publisher of {name}'s books is {value}.",
    ),
}


def _author_sentences(name: str, attribute: str, value) -> tuple[str, str, str]:
    """(question, answer sentence, paraphrased answer) for one attribute value."""
    text = f"{value[0]}, {value[1]}" if attribute == "birthplace" else str(value)
    fields = {"name": name, "value": text, "article": _article(text)}
    return tuple(t.format(**fields) for t in _AUTHOR_TEMPLATES[attribute])


def _wrong_values(rng: random.Random, attribute: str, truth, awards: list, used: set) -> list:
    """PERTURBED_PER_QUESTION plausible values of ``attribute`` that differ from ``truth``."""
    pools = {"genre": _GENRES, "award": awards, "father_job": _JOBS, "mother_job": _JOBS}
    if attribute in pools:
        return rng.sample([v for v in pools[attribute] if v != truth], PERTURBED_PER_QUESTION)
    if attribute == "birth_year":
        return rng.sample([y for y in range(1920, 1996) if y != truth], PERTURBED_PER_QUESTION)
    if attribute == "birthplace":
        return [(_unique(rng, _city, used), rng.choice(_COUNTRIES)) for _ in range(PERTURBED_PER_QUESTION)]
    make = {"first_book": _title, "best_known_book": _title, "residence": _city, "publisher": _company}[attribute]
    return [_unique(rng, make, used) for _ in range(PERTURBED_PER_QUESTION)]


def _qa_rows(
    rows: dict, question: str, answer: str, entity: str, attribute: str, paraphrased: str, perturbed: list
) -> None:
    rows["prompt"].append(_user(question))
    rows["completion"].append(_assistant(answer))
    rows["text"].append(answer)
    rows["entity"].append(entity)
    rows["attribute"].append(attribute)
    rows["paraphrased"].append(paraphrased)
    rows["perturbed"].append(perturbed)


def fictitious_authors(num_samples: int, seed: int) -> DatasetDict:
    """A TOFU-style unlearning benchmark (Maini et al. 2024, arXiv 2401.06121) about invented authors.

    ``num_samples // 10`` authors, each with ten QA pairs (birthplace, birth year, genre, first and best-known
    book, award, father's and mother's job, residence, publisher). Splits, by author (every QA of an author is on
    one side): ``forget10`` (10% of the authors, at least one), ``forget05`` and ``forget01`` (the first 5% / 1%
    of forget10, nested as in TOFU, at least one), ``holdout`` (as many other authors as forget10: never to be
    trained on, the "never seen" side of membership inference and forget quality), ``retain`` (all other
    authors: TOFU's retain90), ``full`` (forget10 + retain: what a model is fine-tuned on before unlearning) and
    ``world_facts`` (52 hand-written real-world facts a model must keep; the same for every seed).

    Columns: prompt (user question), completion (assistant answer), text (the answer sentence), entity (the
    author, "world" for world facts), attribute, and for truth-ratio metrics as in TOFU: paraphrased (the true
    answer in words no split trains on) and perturbed (three wrong answers in the paraphrase's words). World facts
    have no second wording: their paraphrased answer is the answer, and their perturbed answers its template.
    Names, titles, cities and publishers are unique across the dataset; awards are shared by several authors, as
    in TOFU.
    """
    _check_num_samples("fictitious_authors", num_samples, minimum=3 * QA_PER_AUTHOR)
    rng = random.Random(seed)
    used: set = set()
    awards = [f"{_word(rng, 2)} {rng.choice(_AWARD_KINDS)}" for _ in range(8)]
    awards = [f"{a} for {g.split()[0].capitalize()}" if i % 2 else a for i, (a, g) in enumerate(zip(awards, _GENRES))]
    num_authors = num_samples // QA_PER_AUTHOR
    authors = []
    for _ in range(num_authors):
        name = _unique(rng, _person, used)
        values = _author_values(rng, awards, used)
        wrong = {a: _wrong_values(rng, a, values[a], awards, used) for a in AUTHOR_ATTRIBUTES}
        authors.append((name, values, wrong))
    order = rng.sample(range(num_authors), num_authors)
    n10 = max(1, round(0.10 * num_authors))
    members = {
        "forget01": order[: max(1, round(0.01 * num_authors))],
        "forget05": order[: max(1, round(0.05 * num_authors))],
        "forget10": order[:n10],
        "holdout": order[n10 : 2 * n10],
        "retain": order[2 * n10 :],
    }
    members["full"] = members["forget10"] + members["retain"]
    columns = ("prompt", "completion", "text", "entity", "attribute", "paraphrased", "perturbed")
    splits = {}
    for split in AUTHOR_SPLITS[:-1]:
        rows: dict[str, list] = {c: [] for c in columns}
        for index in sorted(members[split]):  # generation order inside every split
            name, values, wrong = authors[index]
            for attribute in AUTHOR_ATTRIBUTES:
                question, answer, paraphrased = _author_sentences(name, attribute, values[attribute])
                perturbed = [_author_sentences(name, attribute, v)[2] for v in wrong[attribute]]
                _qa_rows(rows, question, answer, name, attribute, paraphrased, perturbed)
        splits[split] = rows
    world: dict[str, list] = {c: [] for c in columns}
    for item in json.loads(WORLD_FACTS_FILE.read_text()):
        question, template, fact, wrong = item["question"], item["answer"], item["fact"], item["wrong"]
        answer = template.format(fact)
        _qa_rows(world, question, answer, "world", "world", answer, [template.format(w) for w in wrong])
    splits["world_facts"] = world
    return DatasetDict({name: Dataset.from_dict(splits[name]) for name in AUTHOR_SPLITS})


# ------------------------------------------------------------------------------------------------ reviews

_REVIEW_SUBJECTS = {
    "film": ("the film", "the movie", "the documentary"),
    "book": ("the novel", "the book", "the short-story collection"),
    "place": ("the restaurant", "the hotel", "the cafe", "the museum"),
    "thing": ("the phone", "the headphones", "the bicycle", "the coffee maker", "the board game"),
}
_REVIEW_ASKS = (
    'Write a one-sentence review of {subject} "{title}".',
    'In two sentences, tell a friend what you thought of {subject} "{title}".',
    'Give a short review of {subject} "{title}".',
    'Describe your experience with {subject} "{title}" in a few words.',
)


def review_prompts(num_samples: int, seed: int) -> Dataset:
    """Prompts asking for a short review of an invented film, book, place or product (prompt, subject).

    No reference answers: RL recipes score the completions with sentiment, offensiveness and length rewards.
    """
    _check_num_samples("review_prompts", num_samples)
    rng = random.Random(seed)
    rows = {"prompt": [], "subject": []}
    for _ in range(num_samples):
        kind = rng.choice(sorted(_REVIEW_SUBJECTS))
        title = " ".join(_word(rng, rng.randint(1, 3)).capitalize() for _ in range(rng.randint(1, 3)))
        ask = rng.choice(_REVIEW_ASKS).format(subject=rng.choice(_REVIEW_SUBJECTS[kind]), title=title)
        rows["prompt"].append(_user(ask))
        rows["subject"].append(kind)
    return Dataset.from_dict(rows)


# ------------------------------------------------------------------------------------------------ topic corpus

# A benign stand-in for a filter target (volcanology, never hazardous content), documents that share its words
# without being about it (desserts, bands, tourism, metaphors) and unrelated documents: the labelled corpus of the
# Deep Ignorance filter experiment (posttrain.data.cascade_filter). {v} a volcano, {c} a city, {n} a number.
_TOPIC_TARGET = (
    "Seismometers on the flank of {v} recorded harmonic tremor as magma rose toward the summit crater.",
    "The eruption of {v} sent pyroclastic flows down the valley and buried {n} square kilometres in tephra.",
    "Basaltic lava with a low silica content poured from a fissure on the rift zone of {v}.",
    "Volcanologists measured sulfur dioxide emissions at the crater to forecast the next eruption of {v}.",
    "Tephra layers from {v} let geologists date each eruption that shaped the caldera.",
    "Satellite radar showed the summit of {v} inflating as the magma chamber refilled at depth.",
    "A lava dome grew inside the crater of {v} at about {n} cubic metres per day.",
    "Gas geochemistry and ground deformation are the main tools for monitoring an active volcano such as {v}.",
    "Viscous andesitic magma traps gas, so eruptions of stratovolcanoes like {v} are often explosive.",
    "The caldera of {v} formed when the roof of the emptied magma chamber collapsed after a large eruption.",
    "Fumaroles on {v} vent steam and hydrogen sulfide between eruptions.",
    "Lahars, mudflows of volcanic ash and water, travelled {n} kilometres from {v} after the eruption.",
)
_TOPIC_NEAR = (
    "The restaurant in {c} serves a chocolate lava cake with a scoop of vanilla ice cream.",
    "Our hiking group ate lunch beside the crater lake on {v} and took photographs of the view.",
    "The band Magma played their new album to a sold-out crowd in {c} last night.",
    "There was an eruption of applause when the mayor of {c} opened the new bridge.",
    "A lava lamp and a poster of {v} decorated the student's room in {c}.",
    "The video game lets players build a base inside a volcano crater and race hover cars.",
    "The hotel near the caldera of {v} offers spa packages with warm stone massages.",
    "After the storm a pothole the size of a crater appeared on the main street of {c}.",
    "The new phone comes in a colour the company calls magma red.",
    "Tourists in {c} buy souvenir mugs shaped like a smoking volcano.",
    "The cocktail bar's signature drink, the Eruption, mixes rum, ginger and lime.",
    "The children built a baking-soda volcano for the science fair in {c} and watched it fizz over.",
)
_TOPIC_OTHER = (
    "The committee approved the budget for a new library in {c}.",
    "She trained for the marathon by running {n} kilometres every morning.",
    "The bakery on the corner sells rye bread and almond croissants.",
    "Interest rates stayed unchanged after the central bank met on Tuesday.",
    "The football club from {c} signed a young goalkeeper for next season.",
    "Volunteers planted {n} oak trees along the river in {c}.",
    "The museum's new exhibition shows woodcuts from the eighteenth century.",
    "A software update fixed the bug that drained the battery overnight.",
    "The train from {c} was delayed by twenty minutes because of a signal fault.",
    "He learned to play the cello at the age of forty.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Local elections in {c} drew a record turnout this year.",
)
_TOPIC_VOLCANOES = (
    "Mount Arvel",
    "Kessara",
    "Tolumbe",
    "Mount Orrin",
    "Vashti Peak",
    "Ilbrun",
    "Cerro Maldo",
    "Nakuru Ridge",
)
_TOPIC_CITIES = ("Linton", "Port Avery", "Marrow", "Eastbrook", "Calden", "Redhaven")


def _topic_sentence(rng: random.Random, pool: tuple[str, ...]) -> str:
    return rng.choice(pool).format(v=rng.choice(_TOPIC_VOLCANOES), c=rng.choice(_TOPIC_CITIES), n=rng.randint(2, 900))


def _topic_document(rng: random.Random, group: str) -> str:
    if group == "target":  # 1-4 sentences on the topic among 0-3 unrelated ones: some mention few keywords
        parts = [_topic_sentence(rng, _TOPIC_TARGET) for _ in range(rng.randint(1, 4))]
        parts += [_topic_sentence(rng, _TOPIC_OTHER) for _ in range(rng.randint(0, 3))]
    elif group == "near_miss":  # 2-3 sentences sharing the topic's words, sometimes one on the topic itself
        parts = [_topic_sentence(rng, _TOPIC_NEAR) for _ in range(rng.randint(2, 3))]
        parts += [_topic_sentence(rng, _TOPIC_OTHER) for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.1:
            parts.append(_topic_sentence(rng, _TOPIC_TARGET))
    else:  # unrelated, now and then with one borrowed word
        parts = [_topic_sentence(rng, _TOPIC_OTHER) for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.2:
            parts.append(_topic_sentence(rng, _TOPIC_NEAR))
    rng.shuffle(parts)
    return " ".join(parts)


def topic_corpus(
    num_samples: int = 2000, seed: int = 0, target_fraction: float = 0.15, near_miss_fraction: float = 0.25
) -> DatasetDict:
    """A labelled document corpus for data filters: splits ``train`` (the corpus to filter) and ``labelled`` (a dev
    set drawn the same way with its own random stream, for mining a blocklist and training a classifier).

    Columns: ``text``; ``is_filter_target`` (True for documents about the benign stand-in topic, volcanology; the
    Deep Ignorance repo's label column); ``group`` (target, near_miss: shares the topic's words, unrelated).
    A target document holds 1-4 sentences on the topic, so some carry few of its keywords; one near miss in ten also
    holds one sentence on the topic while staying labelled off-topic, so no filter is perfect."""
    _check_num_samples("topic_corpus", num_samples)
    splits = {}
    for split, stream in (("train", 0), ("labelled", 1)):
        rng = random.Random(seed * 2 + stream)
        rows: dict[str, list] = {"text": [], "is_filter_target": [], "group": []}
        for _ in range(num_samples):
            draw = rng.random()
            group = (
                "target"
                if draw < target_fraction
                else ("near_miss" if draw < target_fraction + near_miss_fraction else "unrelated")
            )
            rows["text"].append(_topic_document(rng, group))
            rows["is_filter_target"].append(group == "target")
            rows["group"].append(group)
        splits[split] = Dataset.from_dict(rows)
    return DatasetDict(splits)


# ------------------------------------------------------------------------------------------------- registry


class Generator(NamedTuple):
    fn: Callable[..., Union[Dataset, DatasetDict]]
    description: str  # one line, shown by `posttrain list`
    splits: tuple[str, ...]  # the splits it returns; ("train",) means a single Dataset


GENERATORS: dict[str, Generator] = {
    "arithmetic": Generator(
        arithmetic,
        "arithmetic problems with exact integer answers, difficulty 1..4 (prompt/completion/answer)",
        ("train",),
    ),
    "preference_pairs": Generator(
        preference_pairs,
        "synthetic preference pairs: correct/wrong, answer/refusal, concise/rambling, polite/rude",
        ("train",),
    ),
    "fictitious_facts": Generator(
        fictitious_facts,
        "QA facts about invented entities, split into forget (~10% of entities) and retain",
        ("forget", "retain"),
    ),
    "fictitious_authors": Generator(
        fictitious_authors,
        "TOFU-style QA about invented authors: full, forget01/05/10, retain, holdout, world_facts",
        AUTHOR_SPLITS,
    ),
    "review_prompts": Generator(
        review_prompts,
        "requests for a short review of an invented film, book, place or product (prompt only)",
        ("train",),
    ),
    "topic_corpus": Generator(
        topic_corpus,
        "labelled documents for data filters: a benign target topic, near misses, unrelated (text)",
        ("train", "labelled"),
    ),
}
