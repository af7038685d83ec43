"""A deterministic corpus of another domain: the records of an invented province.

The fine-tuning text of ``benchmarks/quality_domain.py``. Not Python, not code: English-like
prose and plain records about a fictional province, generated from a probabilistic grammar
over one fixed *world* of facts. The world (towns, the roads between them with their lengths,
rivers, founding years, the towns' trades and market prices, 400 people with a birth year,
home town, trade, spouse and sibling) is drawn once from ``WORLD_SEED``; every split is
written about the same world, so what the training text teaches (which town lies on which
river, how far it is from A to B, who is married to whom, what bread costs in a town) is
what the held-out text needs. The splits differ only in the document seed (``SPLIT_SEEDS``).

Five kinds of document, drawn at random (weights in ``KINDS``):

- **registry entries**: ``REGISTRY ENTRY 0123`` then ``name: / born: / trade: / resides: /
  spouse: / sibling:`` lines (the entry number is the person's, the fields are the world's);
- **gazetteer entries**: a paragraph on a town (river, founding year, population, trade, the
  roads that leave it and their lengths in leagues), sentences chosen from several forms;
- **travel logs**: a person's journey as a walk on the road graph, one line a day with the
  leg's length, and the total at the end (the sum of the legs);
- **market reports**: a town's prices in one season, each with the change from the season
  before (prices follow the town's base price and a seasonal swing, so the changes are
  consistent with the prices);
- **letters**: a person writes to their spouse or sibling from a town on the road, with the
  world's facts in varied sentences.

Sizes (counted with ``examples/tiny-moe-stdlib``'s tokenizer, measured by
``tests/test_domain_corpus.py`` on a slice and by the benchmark in full):
``TRAIN_DOCS`` = 10,500 documents, about 1.11 M tokens; ``HELD_OUT_DOCS`` = 640, about 68 k
tokens (a held-out document identical to a training one is drawn again: none is shared).
Generating both takes well under a second.

    python examples/make_domain_corpus.py --out-dir /tmp/q-domain/corpus   # train.txt, held_out.txt
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path

WORLD_SEED = 20240601
SPLIT_SEEDS = {"train": 1, "held_out": 2}
TRAIN_DOCS = 10_500
HELD_OUT_DOCS = 640
DOC_SEPARATOR = "\n\n"  # the benchmark tokenizes documents one by one (end-of-text after each)

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "r",
           "s", "st", "t", "th", "v", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "nd", "m", "ck"]
_TOWN_ENDS = ["ford", "holm", "wick", "stead", "mere", "by", "ton", "gate", "hall", "moor"]
FIRST_NAMES = ["Mara", "Tomas", "Ilse", "Oren", "Brida", "Kestrel", "Anwen", "Hale", "Lio",
               "Senna", "Corin", "Dara", "Edric", "Fenna", "Garrick", "Hesper", "Ivo", "Jora",
               "Kai", "Lenna", "Maren", "Nils", "Odile", "Piet", "Rosa", "Soren", "Talia",
               "Ulric", "Vesna", "Wendel", "Yara", "Zeno", "Agnes", "Bram", "Celia", "Dorian"]
TRADES = ["baker", "glassblower", "ferryman", "weaver", "smith", "miller", "tanner", "potter",
          "chandler", "cooper", "mason", "herbalist", "scribe", "fisher", "carter", "brewer"]
GOODS = ["bread", "salt", "wool", "iron nails", "lamp oil", "barley", "cheese", "rope",
         "candles", "honey", "timber", "dried fish"]
SEASONS = ["spring", "summer", "autumn", "winter"]
RIVERS = ["Alder", "Brack", "Sellow", "Tarn", "Wend", "Ommer"]
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


@dataclass
class Town:
    name: str
    river: str
    founded: int
    population: int
    trade: str  # one of GOODS: what the town is known for
    price_factor: float
    roads: dict[str, int] = field(default_factory=dict)  # town name -> leagues


@dataclass
class Person:
    number: int
    first: str
    family: str
    born: int
    home: str
    trade: str
    spouse: int | None = None
    sibling: int | None = None

    @property
    def name(self) -> str:
        return f"{self.first} {self.family}"


@dataclass
class World:
    towns: dict[str, Town]
    people: list[Person]
    base_price: dict[str, int]  # good -> coins in an average town, average season
    season_swing: dict[str, list[int]]  # good -> change per season (sums to 0)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables))


def make_world(seed: int = WORLD_SEED, n_towns: int = 24, n_people: int = 400) -> World:
    """The fixed facts every split is written about."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_towns:
        n = (_word(rng, 1) + rng.choice(_TOWN_ENDS)).capitalize()
        if n not in names:
            names.append(n)
    towns = {n: Town(n, rng.choice(RIVERS), rng.randrange(1100, 1700),
                     rng.randrange(3, 90) * 100, rng.choice(GOODS),
                     rng.choice([0.8, 0.9, 1.0, 1.1, 1.2, 1.3])) for n in names}
    for i, n in enumerate(names):  # a ring (connected) plus random chords
        for m in [names[(i + 1) % n_towns]] + rng.sample(names, 2):
            if m != n and m not in towns[n].roads and len(towns[m].roads) < 5:
                d = rng.randrange(3, 30)
                towns[n].roads[m] = d
                towns[m].roads[n] = d
    families = sorted({_word(rng, 2).capitalize() for _ in range(160)})
    people = [Person(i + 1, rng.choice(FIRST_NAMES), rng.choice(families),
                     rng.randrange(1580, 1640), rng.choice(names), rng.choice(TRADES))
              for i in range(n_people)]
    order = list(range(n_people))
    rng.shuffle(order)
    for a, b in zip(order[0:160:2], order[1:160:2]):
        people[a].spouse, people[b].spouse = b, a
    for a, b in zip(order[160:280:2], order[161:280:2]):
        people[a].sibling, people[b].sibling = b, a
        people[b].family = people[a].family
    base = {g: rng.randrange(4, 60) for g in GOODS}
    swing = {}
    for g in GOODS:
        s = [rng.randrange(-3, 4) for _ in range(3)]
        swing[g] = s + [-sum(s)]
    return World(towns, people, base, swing)


def price(world: World, town: str, good: str, season: int) -> int:
    """Coins for a measure of ``good`` in ``town`` in season index ``season`` (0-3)."""
    t = world.towns[town]
    local = 0.75 if t.trade == good else 1.0  # cheaper where it is made
    return max(1, round(world.base_price[good] * t.price_factor * local)
               + sum(world.season_swing[good][:season + 1]))


def _measure(good: str) -> str:
    return {"bread": "loaf", "salt": "sack", "wool": "bale", "iron nails": "pound",
            "lamp oil": "jar", "barley": "bushel", "cheese": "wheel", "rope": "coil",
            "candles": "dozen", "honey": "pot", "timber": "load",
            "dried fish": "basket"}[good]


def _count(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def registry(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    lines = [f"REGISTRY ENTRY {p.number:04d}", f"name: {p.name}", f"born: {p.born}, {p.home}",
             f"trade: {p.trade}", f"resides: {p.home}"]
    if p.spouse is not None:
        lines.append(f"spouse: {world.people[p.spouse].name}")
    if p.sibling is not None:
        lines.append(f"sibling: {world.people[p.sibling].name}")
    lines.append(f"recorded: {rng.choice(SEASONS)} of {rng.randrange(1650, 1670)}")
    return "\n".join(lines)


def gazetteer(world: World, rng: random.Random) -> str:
    t = world.towns[rng.choice(sorted(world.towns))]
    first = rng.choice([
        f"{t.name} is a town on the river {t.river}.",
        f"The town of {t.name} stands on the {t.river}.",
        f"{t.name} lies on the banks of the {t.river}.",
    ])
    parts = [first, rng.choice([
        f"It was founded in {t.founded} and has about {t.population} people.",
        f"Founded in {t.founded}, it is home to some {t.population} souls.",
        f"About {t.population} people live there; the town dates from {t.founded}.",
    ]), rng.choice([
        f"It is known for its {t.trade}.",
        f"Its markets are famous for {t.trade}.",
        f"Travellers come to {t.name} for its {t.trade}.",
    ])]
    roads = sorted(t.roads.items())
    rng.shuffle(roads)
    listed = ", ".join(f"{m} ({d} leagues)" for m, d in roads)
    parts.append(rng.choice([f"Roads lead to {listed}.", f"From {t.name} one may travel to "
                                                         f"{listed}."]))
    if rng.random() < 0.5:
        near = min(t.roads.items(), key=lambda kv: (kv[1], kv[0]))
        parts.append(f"The nearest town is {near[0]}, {_count(near[1])} leagues away.")
    return " ".join(parts)


def travel_log(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    here, days, total = p.home, rng.randrange(2, 7), 0
    lines = [rng.choice([f"Travel log of {p.name}, {p.trade} of {p.home}.",
                         f"The journey of {p.name}, a {p.trade} from {p.home}."])]
    for day in range(1, days + 1):
        there, d = rng.choice(sorted(world.towns[here].roads.items()))
        total += d
        verb = rng.choice(["walked", "rode", "went"])
        line = f"Day {day}: {verb} from {here} to {there}, {d} leagues"
        if world.towns[there].river == world.towns[here].river and rng.random() < 0.5:
            line += f" along the {world.towns[there].river}"
        lines.append(line + ".")
        here = there
    lines.append(rng.choice([f"In all, {total} leagues in {_count(days)} days.",
                             f"Total: {total} leagues over {days} days."]))
    return "\n".join(lines)


def market_report(world: World, rng: random.Random) -> str:
    town = rng.choice(sorted(world.towns))
    season = rng.randrange(4)
    year = rng.randrange(1650, 1670)
    lines = [f"MARKET OF {town.upper()}, {SEASONS[season].upper()} {year}"]
    for good in rng.sample(GOODS, rng.randrange(3, 7)):
        now, before = price(world, town, good, season), price(world, town, good, season - 1)
        change = ("unchanged" if now == before else
                  f"up {now - before}" if now > before else f"down {before - now}")
        lines.append(f"{good}: {now} coins the {_measure(good)} ({change})")
    return "\n".join(lines)


def letter(world: World, rng: random.Random) -> str:
    p = rng.choice([q for q in world.people if q.spouse is not None or q.sibling is not None])
    to = world.people[p.spouse if p.spouse is not None else p.sibling]  # type: ignore[index]
    town, d = rng.choice(sorted(world.towns[p.home].roads.items()))
    t = world.towns[town]
    good = t.trade
    season = rng.randrange(4)
    greeting = rng.choice(["Dear", "My dear", "Dearest"]) + f" {to.first},"
    body = [rng.choice([f"I write to you from {town}, on the {t.river}.",
                        f"I have reached {town} at last.",
                        f"This letter comes to you from {town}."]),
            rng.choice([f"The road from {p.home} was {d} leagues and the weather was "
                        f"{rng.choice(['kind', 'cold', 'wet', 'hot'])}.",
                        f"It is {d} leagues from {p.home}, and I felt every one of them."]),
            rng.choice([f"Here {good} costs {price(world, town, good, season)} coins the "
                        f"{_measure(good)}, cheaper than at home.",
                        f"The {good} of {town} is as good as they say."]),
            rng.choice([f"I shall be home in {_count(rng.randrange(2, 9))} days.",
                        f"Tell the {p.trade}s' guild I will be back before "
                        f"{SEASONS[(season + 1) % 4]}."])]
    sign = rng.choice(["With love", "Your", "Ever yours"])
    return f"{greeting}\n" + " ".join(body) + f"\n{sign},\n{p.first}"


KINDS = [(registry, 3), (gazetteer, 2), (travel_log, 3), (market_report, 3), (letter, 3)]


def documents(split: str, n_docs: int | None = None, world: World | None = None) -> list[str]:
    """The documents of ``split`` ("train" or "held_out"); ``n_docs`` defaults to the split's
    full size. Deterministic: the same arguments give the same list."""
    world = world or make_world()
    n = n_docs if n_docs is not None else {"train": TRAIN_DOCS, "held_out": HELD_OUT_DOCS}[split]
    rng = random.Random(SPLIT_SEEDS[split])
    makers = [k for k, w in KINDS for _ in range(w)]
    seen = set(documents("train", world=world)) if split != "train" else set()
    out: list[str] = []
    while len(out) < n:
        doc = rng.choice(makers)(world, rng)
        if doc not in seen:  # a held-out document never repeats a training one
            out.append(doc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="write train.txt and held_out.txt here (default: none, "
                             "required)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SEEDS:
        docs = documents(split)
        (args.out_dir / f"{split}.txt").write_text(DOC_SEPARATOR.join(docs) + "\n")
        print(f"{split}: {len(docs)} documents, {sum(map(len, docs))} characters")


if __name__ == "__main__":
    main()
