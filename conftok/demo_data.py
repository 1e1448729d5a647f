"""The project's own small demo data: BoolQ-like and MedQA-like rows, made here, no download.

The rows have the raw schemas of the real sets, so every loader, tagger and validator runs on
them unchanged:

* BoolQ-like: ``{"id", "question", "passage", "title", "answer": bool}``. Short passages about
  invented towns, animals, rivers, farms, inventions, clubs and people; the answer follows from
  the passage alone. Some questions are lookups, others need a negation, a comparison or a
  little arithmetic, so a 135M model gets some right and some wrong (the confidence token needs
  both). Questions are lower case without "?", as in BoolQ.
* MedQA-like: ``{"id", "question", "options": {"A".."D"}, "answer": letter}`` from a small table
  of general and basic medical facts; the three distractors are other answers of the same
  table, the correct letter is spread evenly over A-D.

Everything is deterministic in ``seed``. Train and validation come from disjoint items: the
invented names (BoolQ) and the facts (MedQA) are split once by a fixed hash, so no validation
question appears in training and no validation fact is taught by a training question.

    python -m conftok.demo_data OUT_DIR     # writes the four JSON-lines files
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_FILES",
    "make_boolq_rows",
    "make_medqa_rows",
    "write_demo_data",
]

SPLITS = ("train", "val")
DEMO_FILES = {
    "boolq_train": "boolq_train.jsonl",
    "boolq_val": "boolq_val.jsonl",
    "medqa_train": "medqa_train.jsonl",
    "medqa_val": "medqa_val.jsonl",
}


def _split_of(key: str) -> str:
    """Fixed train/val assignment of a name or fact: about one in four goes to validation.

    crc32, not ``hash()``: the split must not change with PYTHONHASHSEED or the seed.
    """
    return "val" if zlib.crc32(key.lower().encode()) % 4 == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _row_id(domain: str, split: str, index: int) -> str:
    """``demo-boolq-0001`` for train, ``demo-boolq-v0001`` for validation (ids stay unique)."""
    middle = "" if split == "train" else split[0]
    return f"demo-{domain}-{middle}{index:04d}"


def _balanced_answers(rng: random.Random, n: int) -> list[bool]:
    """n booleans, half True (the odd one out is random), in random order."""
    answers = [i % 2 == 0 for i in range(n)]
    if n % 2 and rng.random() < 0.5:
        answers[-1] = False
    rng.shuffle(answers)
    return answers


# --------------------------------------------------------------------------------------------
# BoolQ-like rows
# --------------------------------------------------------------------------------------------

_TOWN_HEADS = [
    "Ash", "Bel", "Bram", "Cal", "Dun", "Elm", "Fen", "Gar", "Hal", "Ives", "Kel", "Lind",
    "Mar", "Nor", "Oak", "Pel", "Quen", "Ros", "Sel", "Tam", "Ul", "Var", "Wen", "Yar",
    "Zel", "Brin", "Corr", "Drel", "Frost", "Gwyn",
]
_TOWN_TAILS = [
    "ford", "holt", "mere", "wick", "by", "stead", "haven", "moor", "bridge", "field",
    "dale", "crest", "port", "well", "thorpe",
]
_FIRST_NAMES = [
    "Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Luca", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tilda", "Umar",
    "Vera", "Wim", "Yara", "Zofia", "Anton", "Berit", "Cyril", "Dora", "Emil", "Freya",
]
_SURNAMES = [
    "Aldane", "Brisk", "Corwen", "Dallow", "Eskel", "Fennick", "Gorse", "Hallam", "Ivory",
    "Jessop", "Kettle", "Lorne", "Mallory", "Nettles", "Orwin", "Pryce", "Quill", "Rowan",
    "Stroud", "Tasker", "Upton", "Vance", "Wexley", "Yelland", "Zander",
]
_SYLLABLES = [
    "ba", "ker", "lo", "mi", "dra", "sen", "tu", "vo", "rin", "gal", "pe", "sha", "no", "fel",
    "qua", "zo", "te", "lum", "ari", "bes",
]
_REGIONS = [
    "in the north of", "in the south of", "in the east of", "in the west of",
    "in the highlands of", "in the lowlands of", "on the coast of",
]
_COUNTRIES = ["Estmark", "Palovia", "Norland", "Carrisk", "Valdora", "Brenmoor", "Ostrava Minor"]
_PRODUCTS = [
    "cheese", "wool", "glassware", "pottery", "cider", "clocks", "lace", "boats", "honey",
    "paper", "salt", "bells",
]
_CLASSES = ["bird", "lizard", "frog", "beetle", "mammal", "fish", "moth", "snail"]
_HABITATS = ["marshes", "pine forests", "dry hills", "river banks", "sea cliffs", "grasslands"]
# (infinitive phrase, third-person phrase)
_BEHAVIOURS = [
    ("migrate in winter", "migrates in winter"),
    ("hibernate", "hibernates"),
    ("lay eggs", "lays eggs"),
    ("live in groups", "lives in groups"),
    ("hunt at night", "hunts at night"),
    ("build nests", "builds nests"),
    ("change colour with the seasons", "changes colour with the seasons"),
    ("dig burrows", "digs burrows"),
]
_FOODS = ["seeds", "insects", "berries", "small fish", "snails", "grass", "nectar", "worms"]
_MOUNTAINS = ["Grey Peaks", "Iron Hills", "Kessel Range", "White Fells", "Tor Mountains"]
_SEAS = ["Amber Sea", "Northern Ocean", "Gulf of Sarn", "Bay of Lenn", "Salt Sea"]
_DEVICES = ["loom", "lamp", "pump", "clock", "press", "kiln", "compass", "stove", "plough"]
_MATERIALS = ["brass", "oak", "iron", "copper", "clay", "tin", "bronze", "glass"]
_TEAM_ANIMALS = ["Falcons", "Wolves", "Otters", "Rams", "Herons", "Badgers", "Foxes", "Stags"]
_ANIMALS_KEPT = ["goats", "sheep", "hens", "ducks", "pigs", "geese", "cows", "rabbits"]


def _name_pools(split: str) -> dict[str, list[str]]:
    """Invented names for one split; the hash split makes the two splits' pools disjoint."""
    towns = [h + t for h in _TOWN_HEADS for t in _TOWN_TAILS]
    people = [f"{f} {s}" for f in _FIRST_NAMES for s in _SURNAMES]
    words = [a + b for a in _SYLLABLES for b in _SYLLABLES if a != b]
    species = [f"{w} {c}" for w in words[::3] for c in _CLASSES]
    rivers = [w.capitalize() for w in words[1::3]]
    pools = {"town": towns, "person": people, "species": species, "river": rivers}
    return {
        kind: [name for name in names if _split_of(f"{kind}:{name}") == split]
        for kind, names in pools.items()
    }


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _other(rng: random.Random, choices: Sequence[Any], *exclude: Any) -> Any:
    return rng.choice([c for c in choices if c not in exclude])


def _boolq_town(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    town = rng.choice(names["town"])
    year = rng.randrange(1150, 1950)
    population = rng.randrange(20, 400) * 50
    product = rng.choice(_PRODUCTS)
    passage = (
        f"{town} is a small town {rng.choice(_REGIONS)} {rng.choice(_COUNTRIES)}. "
        f"It was founded in {year} by {rng.choice(names['person'])} and today has about "
        f"{population:,} inhabitants. The town is best known for its {product}, and it holds "
        f"a market every {rng.choice(['Monday', 'Thursday', 'Saturday'])}."
    )
    kind = rng.randrange(3)
    if kind == 0:  # comparison of years
        other_year = year + rng.randrange(1, 80) * (1 if answer else -1)
        question = f"was {town} founded before {other_year}"
    elif kind == 1:  # comparison of numbers
        shift = rng.choice([0.5, 0.7, 0.9]) if answer else rng.choice([1.2, 1.5, 2.0])
        question = f"does {town} have more than {int(population * shift):,} inhabitants"
    else:  # lookup
        asked = product if answer else _other(rng, _PRODUCTS, product)
        question = f"is {town} known for its {asked}"
    return town, passage, question


def _boolq_species(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    species = rng.choice(names["species"])
    behaviour, behaviours = rng.choice(_BEHAVIOURS)
    food = rng.choice(_FOODS)
    does = rng.random() < 0.5
    habit = (
        f"Like most of its relatives, it {behaviours}."
        if does
        else f"Unlike most of its relatives, it does not {behaviour}."
    )
    passage = (
        f"The {species} is found in the {rng.choice(_HABITATS)} of {rng.choice(_COUNTRIES)}."
        f" {habit} It feeds mainly on {food} and rarely lives "
        f"longer than {rng.randrange(2, 12)} years."
    )
    if rng.random() < 0.6:  # the behaviour: passage and question each with or without a negation
        never = "" if does == answer else "never "
        question = f"does the {species} {never}{behaviour}"
    else:
        asked = food if answer else _other(rng, _FOODS, food)
        question = f"does the {species} feed mainly on {asked}"
    return species, passage, question


def _boolq_farm(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    person = rng.choice(names["person"])
    first = person.split()[0]
    kinds = rng.sample(_ANIMALS_KEPT, 3)
    counts = [rng.randrange(3, 25) for _ in kinds]
    while len(set(counts)) < 3:
        counts = [rng.randrange(3, 25) for _ in kinds]
    sold = rng.randrange(1, counts[0])
    passage = (
        f"{person} runs a small farm outside {rng.choice(names['town'])}. {first} keeps "
        f"{counts[0]} {kinds[0]}, {counts[1]} {kinds[1]} and {counts[2]} {kinds[2]}. Last spring "
        f"{first} sold {sold} of the {kinds[0]} at the market and bought nothing new."
    )
    if rng.random() < 0.5:  # subtraction
        left = counts[0] - sold
        threshold = rng.randrange(max(0, left - 3), left) if answer else left + rng.randrange(0, 4)
        question = f"does {person} still have more than {threshold} {kinds[0]}"
    else:  # comparison of two counts
        a, b = (1, 2) if (counts[1] > counts[2]) == answer else (2, 1)
        question = f"does {person} keep more {kinds[a]} than {kinds[b]}"
    return person, passage, question


def _boolq_rivers(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    main, branch = rng.sample(names["river"], 2)
    main_km = rng.randrange(120, 900)
    branch_km = rng.randrange(40, 1200)
    while abs(main_km - branch_km) < 10:
        branch_km = rng.randrange(40, 1200)
    passage = (
        f"The {main} and the {branch} both rise in the {rng.choice(_MOUNTAINS)}. The {main} is "
        f"{main_km} kilometres long and flows into the {rng.choice(_SEAS)}, while the {branch}, "
        f"at {branch_km} kilometres, joins the {main} near {rng.choice(names['town'])}."
    )
    if rng.random() < 0.6:  # comparison of lengths
        longer, shorter = (main, branch) if main_km > branch_km else (branch, main)
        first, second = (longer, shorter) if answer else (shorter, longer)
        question = f"is the {first} river longer than the {second}"
    else:  # direction of flow
        first, second = (branch, main) if answer else (main, branch)
        question = f"does the {first} flow into the {second}"
    return f"{main} (river)", passage, question


def _boolq_invention(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    inventor = rng.choice(names["person"])
    device = f"{rng.choice(names['town'])} {rng.choice(_DEVICES)}"
    invented = rng.randrange(1600, 1950)
    same_year = rng.random() < 0.4
    patented = invented if same_year else invented + rng.randrange(2, 30)
    material = rng.choice(_MATERIALS)
    patent = (
        f"It was patented in {patented}, the same year." if same_year
        else f"It was not patented until {patented}."
    )
    passage = (
        f"The {device} was invented by {inventor} in {invented}. {patent} The first models were "
        f"made of {material} and were sold mainly to "
        f"{rng.choice(['farmers', 'weavers', 'ships', 'schools'])}."
    )
    kind = rng.randrange(3)
    if kind == 0:  # same year or not, stated positively or with "not ... until"
        if same_year == answer:
            question = f"was the {device} patented in the same year it was invented"
        elif answer:  # patented later: ask about a gap shorter than the real one
            gap = rng.randrange(1, patented - invented)
            question = f"was the {device} patented more than {gap} years after it was invented"
        else:  # patented the same year: ask about a later year
            question = f"was the {device} patented in {patented + rng.randrange(1, 5)}"
    elif kind == 1:
        asked = inventor if answer else _other(rng, names["person"], inventor)
        question = f"was the {device} invented by {asked}"
    else:
        asked = material if answer else _other(rng, _MATERIALS, material)
        question = f"were the first {_plural(device)} made of {asked}"
    return device, passage, question


def _boolq_club(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    town, rival, cup_town = rng.sample(names["town"], 3)
    team = f"{town} {rng.choice(_TEAM_ANIMALS)}"
    years = sorted(rng.sample(range(1950, 2024), 3))
    won = rng.sample(years, 2)
    lost = next(y for y in years if y not in won)
    passage = (
        f"The {team} are a football club founded in {years[0] - rng.randrange(5, 60)}. They won "
        f"the {cup_town} Cup in {min(won)} and {max(won)}. They also reached the final in {lost}, "
        f"but lost it to {rival}."
    )
    kind = rng.randrange(3)
    if kind == 0:
        asked = rng.choice(won) if answer else lost
        question = f"did the {team} win the {cup_town} cup in {asked}"
    elif kind == 1:
        how_often = "more than once" if answer else "more than twice"  # they won it twice
        question = f"have the {team} won the {cup_town} cup {how_often}"
    else:
        asked = (
            rival if answer else _other(rng, names["town"], rival, town, cup_town)
        )
        question = f"did the {team} lose a {cup_town} cup final to {asked}"
    return team, passage, question


def _boolq_life(rng: random.Random, names: dict, answer: bool) -> tuple[str, str, str]:
    person = rng.choice(names["person"])
    home, new_home = rng.sample(names["town"], 2)
    born = rng.randrange(1700, 1950)
    moved_at = rng.randrange(15, 45)
    died = born + moved_at + rng.randrange(5, 50)
    passage = (
        f"{person} was a painter born in {home} in {born}. At the age of {moved_at}, "
        f"{person.split()[0]} moved to {new_home}, where the family lived until "
        f"{person.split()[0]}'s death in {died}."
    )
    if rng.random() < 0.5:  # arithmetic: years lived in the new town
        years = died - born - moved_at
        threshold = years - rng.randrange(1, 5) if answer else years + rng.randrange(0, 5)
        question = f"did {person} live in {new_home} for more than {threshold} years"
    else:  # arithmetic: age at death
        age = died - born
        threshold = age - rng.randrange(1, 10) if answer else age + rng.randrange(0, 10)
        question = f"was {person} older than {threshold} at death"
    return person, passage, question


_BOOLQ_TEMPLATES: list[Callable[[random.Random, dict, bool], tuple[str, str, str]]] = [
    _boolq_town, _boolq_species, _boolq_farm, _boolq_rivers, _boolq_invention, _boolq_club,
    _boolq_life,
]


def make_boolq_rows(n: int, seed: int = 0, *, split: str = "train") -> list[dict]:
    """``n`` BoolQ-like rows ``{"id", "question", "passage", "title", "answer": bool}``.

    Deterministic in ``(n, seed, split)``; half the answers are True (the odd one out random);
    questions are unique within the list, and the names in ``split="val"`` rows never occur in
    ``split="train"`` rows. Ids: ``demo-boolq-0001`` (train), ``demo-boolq-v0001`` (val).
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"conftok-demo-boolq-{split}-{seed}")
    names = _name_pools(split)
    rows: list[dict] = []
    seen: set[str] = set()
    for want in _balanced_answers(rng, n):
        for _attempt in range(100):
            template = rng.choice(_BOOLQ_TEMPLATES)
            title, passage, question = template(rng, names, want)
            question = question.lower()
            if question not in seen:
                break
        else:  # pragma: no cover - the name pools hold thousands of combinations
            raise RuntimeError(f"could not make {n} distinct BoolQ-like questions")
        seen.add(question)
        rows.append(
            {
                "id": _row_id("boolq", split, len(rows) + 1),
                "question": question,
                "passage": passage,
                "title": title,
                "answer": want,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# MedQA-like rows
# --------------------------------------------------------------------------------------------

# category -> (question templates with {subject}, [(subject, answer, split key or None)]).
# The split key ties facts that say the same thing both ways (scurvy <-> vitamin C) to one side.
_FACTS: dict[str, tuple[list[str], list[tuple[str, str, str | None]]]] = {
    "organ": (
        ["Which organ {subject}?", "In the human body, which organ {subject}?"],
        [
            ("pumps blood through the circulatory system", "Heart", None),
            ("produces insulin", "Pancreas", None),
            ("produces bile", "Liver", None),
            ("filters the blood to form urine", "Kidney", None),
            ("exchanges oxygen and carbon dioxide with the air", "Lungs", None),
            ("stores bile between meals", "Gallbladder", None),
            ("absorbs most of the water from digested food", "Large intestine", None),
            ("absorbs most of the nutrients from digested food", "Small intestine", None),
            ("produces the hormone thyroxine", "Thyroid gland", None),
            ("secretes growth hormone", "Pituitary gland", None),
            ("secretes adrenaline", "Adrenal gland", None),
            ("stores urine until it leaves the body", "Urinary bladder", None),
            ("removes old red blood cells from the blood", "Spleen", None),
            ("secretes hydrochloric acid to digest food", "Stomach", None),
            ("produces the hormone melatonin", "Pineal gland", None),
            ("coordinates balance and fine movement", "Cerebellum", None),
        ],
    ),
    "deficiency": (
        [
            "Deficiency of which nutrient causes {subject}?",
            "A patient is diagnosed with {subject}. A deficiency of which of the following is "
            "the most likely cause?",
        ],
        [
            ("scurvy", "Vitamin C", "scurvy"),
            ("rickets", "Vitamin D", "rickets"),
            ("beriberi", "Vitamin B1 (thiamine)", "beriberi"),
            ("pellagra", "Vitamin B3 (niacin)", "pellagra"),
            ("night blindness", "Vitamin A", "night blindness"),
            ("pernicious anemia", "Vitamin B12", None),
            ("goiter", "Iodine", "goiter"),
            ("neural tube defects in the newborn", "Folic acid", None),
            ("bleeding from impaired blood clotting", "Vitamin K", None),
            ("microcytic anemia", "Iron", "iron anemia"),
            ("Keshan disease", "Selenium", None),
            ("osteomalacia in adults", "Vitamin D", None),
        ],
    ),
    "deficiency_disease": (
        [
            "A long-lasting lack of {subject} in the diet causes which disease?",
            "Which disease results from a severe deficiency of {subject}?",
        ],
        [
            ("vitamin C", "Scurvy", "scurvy"),
            ("vitamin B1 (thiamine)", "Beriberi", "beriberi"),
            ("vitamin B3 (niacin)", "Pellagra", "pellagra"),
            ("vitamin D in children", "Rickets", "rickets"),
            ("iodine", "Goiter", "goiter"),
            ("vitamin A", "Night blindness", "night blindness"),
            ("iron", "Iron deficiency anemia", "iron anemia"),
        ],
    ),
    "bone": (
        ["Which bone is {subject}?", "What is the anatomical name of {subject}?"],
        [
            ("the longest bone in the human body", "Femur", None),
            ("the kneecap", "Patella", None),
            ("the collarbone", "Clavicle", None),
            ("the shoulder blade", "Scapula", None),
            ("the shin bone", "Tibia", None),
            ("the bone of the upper arm", "Humerus", None),
            ("the bone of the lower jaw", "Mandible", None),
            ("the breastbone", "Sternum", None),
            ("the thinner bone of the lower leg", "Fibula", None),
            ("the heel bone", "Calcaneus", None),
            ("the forearm bone on the thumb side", "Radius", None),
            ("the forearm bone on the little-finger side", "Ulna", None),
            ("the smallest bone of the body, in the middle ear", "Stapes", None),
            ("the tailbone", "Coccyx", None),
        ],
    ),
    "drug_class": (
        [
            "{subject} belongs to which class of drugs?",
            "A patient is started on {subject}. To which drug class does this medication belong?",
        ],
        [
            ("Metformin", "Biguanide", None),
            ("Atorvastatin", "Statin", None),
            ("Amoxicillin", "Penicillin antibiotic", None),
            ("Lisinopril", "ACE inhibitor", None),
            ("Metoprolol", "Beta blocker", None),
            ("Omeprazole", "Proton pump inhibitor", None),
            ("Ibuprofen", "Nonsteroidal anti-inflammatory drug", None),
            ("Sertraline", "Selective serotonin reuptake inhibitor", None),
            ("Furosemide", "Loop diuretic", None),
            ("Amlodipine", "Calcium channel blocker", None),
            ("Warfarin", "Vitamin K antagonist", None),
            ("Loratadine", "Antihistamine", None),
            ("Morphine", "Opioid analgesic", None),
            ("Losartan", "Angiotensin receptor blocker", None),
            ("Diazepam", "Benzodiazepine", None),
            ("Hydrochlorothiazide", "Thiazide diuretic", None),
            ("Prednisone", "Corticosteroid", None),
        ],
    ),
    "treatment": (
        [
            "Which drug is the standard treatment for {subject}?",
            "A patient presents with {subject}. Which drug should be given?",
        ],
        [
            ("type 1 diabetes", "Insulin", None),
            ("hypothyroidism", "Levothyroxine", None),
            ("anaphylaxis", "Epinephrine", None),
            ("an opioid overdose", "Naloxone", None),
            ("an acute asthma attack", "Salbutamol", None),
            ("a paracetamol overdose", "Acetylcysteine", None),
            ("influenza within two days of onset", "Oseltamivir", None),
            ("a herpes simplex infection", "Aciclovir", None),
            ("a benzodiazepine overdose", "Flumazenil", None),
        ],
    ),
    "pathogen": (
        ["Which organism causes {subject}?", "{subject} is caused by which of the following organisms?"],
        [
            ("malaria", "Plasmodium", None),
            ("tuberculosis", "Mycobacterium tuberculosis", None),
            ("cholera", "Vibrio cholerae", None),
            ("syphilis", "Treponema pallidum", None),
            ("Lyme disease", "Borrelia burgdorferi", None),
            ("chickenpox", "Varicella-zoster virus", None),
            ("AIDS", "Human immunodeficiency virus", None),
            ("tetanus", "Clostridium tetani", None),
            ("whooping cough", "Bordetella pertussis", None),
            ("typhoid fever", "Salmonella Typhi", None),
            ("leprosy", "Mycobacterium leprae", None),
            ("strep throat", "Streptococcus pyogenes", None),
        ],
    ),
    "capital": (
        ["What is the capital of {subject}?", "Which city is the capital of {subject}?"],
        [
            ("France", "Paris", None), ("Japan", "Tokyo", None), ("Italy", "Rome", None),
            ("Canada", "Ottawa", None), ("Australia", "Canberra", None), ("Egypt", "Cairo", None),
            ("Spain", "Madrid", None), ("Germany", "Berlin", None), ("Brazil", "Brasilia", None),
            ("Kenya", "Nairobi", None), ("Norway", "Oslo", None), ("Peru", "Lima", None),
            ("India", "New Delhi", None), ("Turkey", "Ankara", None), ("Russia", "Moscow", None),
            ("Argentina", "Buenos Aires", None), ("Sweden", "Stockholm", None),
            ("Poland", "Warsaw", None), ("Portugal", "Lisbon", None), ("Greece", "Athens", None),
        ],
    ),
    "count": (
        ["How many {subject}?"],
        [
            ("chambers does the human heart have", "4", None),
            ("bones are in the adult human skeleton", "206", None),
            ("chromosomes are in a normal human body cell", "46", None),
            ("permanent teeth does an adult have, wisdom teeth included", "32", None),
            ("pairs of ribs does a typical human have", "12", None),
            ("vertebrae are in the human neck", "7", None),
            ("lobes does the right lung have", "3", None),
            ("lobes does the left lung have", "2", None),
        ],
    ),
    "blood": (
        ["Which component of blood {subject}?"],
        [
            ("carries oxygen from the lungs to the tissues", "Red blood cells", None),
            ("helps the blood to clot", "Platelets", None),
            ("fights infections", "White blood cells", None),
            ("is the liquid in which the cells are suspended", "Plasma", None),
            ("is the protein in red cells that binds oxygen", "Hemoglobin", None),
        ],
    ),
    "gas": (
        ["Which gas {subject}?"],
        [
            ("do plants take in for photosynthesis", "Carbon dioxide", None),
            ("makes up most of the Earth's atmosphere", "Nitrogen", None),
            ("do humans need to breathe in to live", "Oxygen", None),
            ("is the lightest of all elements", "Hydrogen", None),
            ("fills party balloons that float", "Helium", None),
            ("smells of rotten eggs", "Hydrogen sulfide", None),
        ],
    ),
}
_OPTION_LETTERS = ("A", "B", "C", "D")


def _medqa_items(split: str) -> list[tuple[str, str, str]]:
    """(category, question, answer) for every fact of ``split`` and every phrasing."""
    items = []
    for category, (templates, facts) in _FACTS.items():
        for subject, answer, key in facts:
            if _split_of(f"fact:{key or category + ':' + subject}") != split:
                continue
            for template in templates:
                question = template.format(subject=subject)
                items.append((category, question[0].upper() + question[1:], answer))
    return items


def make_medqa_rows(n: int, seed: int = 0, *, split: str = "train") -> list[dict]:
    """``n`` MedQA-like rows ``{"id", "question", "options": {"A".."D"}, "answer": letter}``.

    Each (fact, phrasing) of the split is used once, in random order, before any is reused
    (reuses get fresh distractors and positions). Distractors are three other answers of the
    same category, distinct from the correct one and from each other (case-insensitive); the
    correct letter takes each of A-D equally often (n // 4 each, the rest random). Facts of
    ``split="val"`` never appear in ``split="train"``. Ids: ``demo-medqa-0001`` (train),
    ``demo-medqa-val-0001`` (val).
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"conftok-demo-medqa-{split}-{seed}")
    items = _medqa_items(split)
    answers_by_category = {
        category: sorted({answer for _, answer, _ in facts}) for category, (_, facts) in _FACTS.items()
    }
    positions = [i % len(_OPTION_LETTERS) for i in range(n)]
    rng.shuffle(positions)
    rows: list[dict] = []
    order: list[tuple[str, str, str]] = []
    for position in positions:
        if not order:
            order = list(items)
            rng.shuffle(order)
        category, question, answer = order.pop()
        pool = [a for a in answers_by_category[category] if a.lower() != answer.lower()]
        texts = rng.sample(pool, len(_OPTION_LETTERS) - 1)
        texts.insert(position, answer)
        rows.append(
            {
                "id": _row_id("medqa", split, len(rows) + 1),
                "question": question,
                "options": dict(zip(_OPTION_LETTERS, texts)),
                "answer": _OPTION_LETTERS[position],
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines to a temp file beside ``path``, then rename it into place."""
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_demo_data(
    out_dir: str | os.PathLike[str], n_train: int = 160, n_val: int = 40, seed: int = 0
) -> dict[str, Path]:
    """Write the four demo files into ``out_dir`` (created if needed); return name -> path.

    Names and files: ``boolq_train`` -> ``boolq_train.jsonl``, ``boolq_val``, ``medqa_train``,
    ``medqa_val`` likewise; ``n_train``/``n_val`` rows per domain. Each file is replaced
    atomically, so a reader never sees a half-written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {"boolq": make_boolq_rows, "medqa": make_medqa_rows}
    paths: dict[str, Path] = {}
    for domain, build in builders.items():
        for split, n in (("train", n_train), ("val", n_val)):
            name = f"{domain}_{split}"
            path = out / DEMO_FILES[name]
            _write_jsonl_atomic(path, build(n, seed, split=split))
            paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m conftok.demo_data",
        description="Write the conftok demo data (JSON lines).")
    parser.add_argument("out_dir", help="directory for the four .jsonl files")
    parser.add_argument("--n-train", type=int, default=160, help="training rows per domain")
    parser.add_argument("--n-val", type=int, default=40, help="validation rows per domain")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    for name, path in write_demo_data(args.out_dir, args.n_train, args.n_val, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
