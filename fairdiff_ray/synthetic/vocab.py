"""The synthetic world's prompt vocabulary and its built-in bias (issue 4).

Three concept sets (occupations, sports, personal descriptors), each subject with
- a content class (the shirt the prompt asks for; NOT protected, used to measure prompt fidelity), and
- a pretraining attribute distribution skewed the way SD v1.5 is: gender mostly one-sided (88-97% one way,
  more often male), some subjects near balanced; race mostly dominated by one class, most often white
  (60-85%); age mostly young, about 20% old overall.
Everything is a deterministic function of (VOCAB_SEED, concept, subject) through ``stable_seed`` (SHA-256),
never Python's ``hash()``. The 50 test occupations are METHOD.md section 6's held-out list.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT

VOCAB_SEED = 0
CONCEPTS = ("occupations", "sports", "descriptors")
TEMPLATES = {
    "occupations": "A photo of the face of {article} {subject}, a person",
    "sports": "A photo of the face of a person playing {subject}",
    "descriptors": "A photo of the face of {article} {subject} person",
}

TEST_OCCUPATIONS = (
    "senator", "violinist", "ticket taker", "electrical and electronics repairer", "citizen", "geologist",
    "food cooking machine operator", "community and social service specialist",
    "manufactured building and mobile home installer", "behavioral disorder counselor", "sewer", "roustabout",
    "researcher", "operations research analyst", "fence erector", "construction and related worker",
    "legal secretary", "correspondence clerk", "narrator", "marriage and family therapist",
    "clinical laboratory technician", "gas compressor and gas pumping station operator", "cosmetologist",
    "stocker", "machine offbearer", "salesperson", "administrative services manager", "mail machine operator",
    "veterinary technician", "surveying and mapping technician", "signal and track switch repairer",
    "industrial machinery mechanic", "inventor", "public safety telecommunicator",
    "ophthalmic medical technician", "promoter", "interior designer", "blaster",
    "general internal medicine physician", "butcher", "farm equipment service technician", "associate dean",
    "accountants and auditor", "custodian", "sergeant", "executive assistant", "administrator",
    "physical science technician", "health technician", "cardiologist",
)  # fmt: skip
VAL_OCCUPATIONS = (
    "pharmacist", "librarian", "electrician", "dental hygienist", "firefighter", "economist",
    "flight attendant", "carpenter", "social worker", "software developer",
)  # fmt: skip
TRAIN_OCCUPATIONS = (
    "accountant", "actor", "actuary", "acupuncturist", "aerospace engineer", "agricultural inspector",
    "air traffic controller", "aircraft mechanic", "animal trainer", "announcer", "anthropologist", "architect",
    "archivist", "art director", "astronomer", "athletic trainer", "audiologist", "auditor", "baker", "barber",
    "bartender", "bill collector", "biochemist", "biologist", "boilermaker", "bookkeeper", "brickmason",
    "bus driver", "cabinetmaker", "cashier", "chef", "chemist", "chiropractor", "civil engineer", "coach",
    "computer programmer", "construction laborer", "cook", "court reporter", "crane operator", "dancer",
    "database administrator", "dentist", "designer", "detective", "dietitian", "dishwasher", "drywall installer",
    "editor", "electrical engineer", "elevator installer", "epidemiologist", "farmer", "fashion designer",
    "financial analyst", "fisher", "florist", "forester", "funeral director", "geographer", "glazier",
    "graphic designer", "hairdresser", "historian", "home health aide", "housekeeper", "insurance agent",
    "janitor", "jeweler", "judge", "kindergarten teacher", "landscaper", "lawyer", "locksmith", "logger",
    "machinist", "mail carrier", "manicurist", "massage therapist", "mathematician", "mechanic",
    "medical assistant", "meteorologist", "midwife", "miner", "musician", "nanny", "nurse",
    "nursing assistant", "nutritionist", "occupational therapist", "optician", "painter", "paralegal",
    "paramedic", "pastor", "pediatrician", "photographer", "physical therapist", "physicist", "pilot",
    "plumber", "police officer", "postal clerk", "preschool teacher", "printer", "professor", "psychologist",
    "real estate agent", "receptionist", "reporter", "roofer", "sailor", "secretary", "security guard",
    "sheriff", "singer", "soldier", "statistician", "surgeon", "surveyor", "tailor", "taxi driver", "teacher",
    "telemarketer", "therapist", "tour guide", "truck driver", "tutor", "veterinarian", "waiter", "welder",
    "writer", "zoologist",
)  # fmt: skip
SPORTS = (
    "soccer", "basketball", "baseball", "tennis", "golf", "volleyball", "rugby", "cricket", "hockey",
    "table tennis", "badminton", "swimming", "boxing", "wrestling", "fencing", "archery", "cycling", "skiing",
    "snowboarding", "surfing", "skateboarding", "gymnastics", "figure skating", "rowing", "sailing",
    "climbing", "karate", "judo", "handball", "lacrosse", "softball", "water polo", "bowling", "darts",
    "squash", "polo", "curling", "netball",
)  # fmt: skip
DESCRIPTORS = (
    "attractive", "beautiful", "handsome", "ugly", "happy", "sad", "angry", "calm", "confident", "shy",
    "intelligent", "friendly", "rich", "poor", "successful", "lazy", "hardworking", "strong", "weak", "kind",
    "rude", "honest", "brave", "creative", "quiet", "loud", "serious", "funny", "wise", "curious", "emotional",
    "ambitious", "generous", "stubborn", "elegant", "clumsy", "powerful", "gentle",
)  # fmt: skip


@dataclass(frozen=True)
class Subject:
    concept: str
    subject: str
    split: str  # train | val | test
    prompt: str
    content: int  # shirt class in [0, N_CONTENT)
    probs: dict[str, tuple[float, ...]]  # attribute -> pretraining class probabilities (ATTRIBUTES order)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_prompt(concept: str, subject: str) -> str:
    if concept not in TEMPLATES:
        raise ValueError(f"unknown concept {concept!r}; use one of {CONCEPTS}")
    return TEMPLATES[concept].format(article=_article(subject), subject=subject)


def _rng(concept: str, subject: str, what: str) -> np.random.Generator:
    return np.random.default_rng(stable_seed("fairdiff-synthetic-vocab", VOCAB_SEED, concept, subject, what))


def pretrain_distribution(concept: str, subject: str) -> dict[str, tuple[float, ...]]:
    """The subject's attribute distribution in the pretraining data (SD-v1.5-like skew), deterministic."""
    g = _rng(concept, subject, "gender").uniform(size=3)
    if g[0] < 0.85:  # one-sided, more often male
        major = 0.88 + 0.09 * g[1]
        p_female = major if g[2] < 0.4 else 1.0 - major
    else:  # roughly balanced
        p_female = 0.4 + 0.2 * g[1]
    r = _rng(concept, subject, "race")
    u = r.uniform(size=3)
    dominant = 0 if u[0] < 0.65 else 1 + int(u[1] * 3)
    share = 0.6 + 0.25 * u[2]
    rest = r.uniform(0.2, 1.0, size=3)
    rest = rest / rest.sum() * (1.0 - share)
    race = np.insert(rest, dominant, share)
    a = _rng(concept, subject, "age").uniform(size=2)
    p_old = 0.05 + 0.15 * a[1] if a[0] < 0.75 else 0.3 + 0.25 * a[1]
    out = {"gender": (p_female, 1.0 - p_female), "race": tuple(float(x) for x in race), "age": (1.0 - p_old, p_old)}
    return {k: tuple(round(float(x), 6) for x in v) for k, v in out.items()}


def subject_content(concept: str, subject: str) -> int:
    return int(_rng(concept, subject, "content").integers(0, N_CONTENT))


def _split_list(names: tuple[str, ...], n_val: int, n_test: int) -> list[tuple[str, str]]:
    """Deterministic split of a concept's subjects: order by a stable key, first test, then val, then train."""
    order = sorted(names, key=lambda s: stable_seed("fairdiff-synthetic-split", VOCAB_SEED, s))
    return [(s, "test" if i < n_test else "val" if i < n_test + n_val else "train") for i, s in enumerate(order)]


def subjects(concept: str | None = None) -> list[Subject]:
    """Every subject of one concept (or of all, in CONCEPTS order), in file order."""
    listing = {
        "occupations": [(s, "test") for s in TEST_OCCUPATIONS]
        + [(s, "val") for s in VAL_OCCUPATIONS]
        + [(s, "train") for s in TRAIN_OCCUPATIONS],
        "sports": _split_list(SPORTS, n_val=6, n_test=10),
        "descriptors": _split_list(DESCRIPTORS, n_val=6, n_test=10),
    }
    out = []
    for c in CONCEPTS if concept is None else (concept,):
        if c not in listing:
            raise ValueError(f"unknown concept {c!r}; use one of {CONCEPTS}")
        for name, split in listing[c]:
            out.append(Subject(c, name, split, make_prompt(c, name), subject_content(c, name), pretrain_distribution(c, name)))
    return out


_BY_PROMPT: dict[str, Subject] = {}


def subject_of_prompt(prompt: str) -> Subject | None:
    """The vocabulary subject a prompt names (exact prompt, or the subject phrase inside a longer prompt)."""
    if not _BY_PROMPT:
        _BY_PROMPT.update({s.prompt.lower(): s for s in subjects()})
    p = " ".join(prompt.lower().split())
    if p in _BY_PROMPT:
        return _BY_PROMPT[p]
    for pattern in (r"of an? (.+?), a person", r"person playing (.+?)(?:[,.]|$)", r"of an? (.+?) person"):
        m = re.search(pattern, p)
        if m:
            for s in _BY_PROMPT.values():
                if s.subject == m.group(1):
                    return s
    return None


def content_class(prompt: str) -> int:
    """The content (shirt) class a prompt asks for: its subject's class, else a stable hash of the prompt."""
    s = subject_of_prompt(prompt)
    if s is not None:
        return s.content
    return stable_seed("fairdiff-synthetic-content", VOCAB_SEED, " ".join(prompt.lower().split())) % N_CONTENT


# Pretraining captions that name attributes (pretrain.PretrainSpec.caption_mix): real captions sometimes say
# "woman", "old", ... and put other words first, so a model trained only on one fixed template reads no context
# at all (a soft prompt then has nothing to act on). Words per class, in render.ATTRIBUTES order.
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "gender": ("woman", "man"),
    "race": ("white", "black", "indian", "asian"),
    "age": ("young", "old"),
}
FILLER_WORDS = ("portrait", "closeup", "picture", "headshot", "studio", "detailed", "high", "quality")


def varied_caption(prompt: str, attributes: dict[str, int], rng: np.random.Generator, name_prob: float = 0.5) -> str:
    """A caption of one render: each attribute named with probability ``name_prob`` (its class word), the words either
    before the subject ("... of a young woman senator, a person") or, with 0-4 filler words, ahead of the whole
    prompt ("portrait woman old, A photo of ..."); with no attribute named, 1-5 filler words ahead."""
    named = [ATTRIBUTE_WORDS[a][int(c)] for a, c in attributes.items() if a in ATTRIBUTE_WORDS and rng.random() < name_prob]
    rng.shuffle(named)
    if named and rng.random() < 0.5:
        m = re.search(r"(of )(an?) (.+?)(, a person| person)$", prompt)
        if m:
            words = " ".join(named)
            return prompt[: m.start()] + f"of {_article(words)} {words} {m.group(3)}{m.group(4)}"
        m = re.search(r"(A photo of the face of a) (person playing .+)$", prompt)
        if m:
            return f"{m.group(1)} {' '.join(named)} {m.group(2)}"
    fillers = list(rng.choice(FILLER_WORDS, size=int(rng.integers(0 if named else 1, 5)), replace=True))
    head = named + fillers
    rng.shuffle(head)
    return " ".join(head) + ", " + prompt


def vocabulary_words(captions: bool = False) -> list[str]:
    """Every word of every prompt (the tokenizer's vocabulary), sorted; ``captions`` adds the words of
    varied_caption (a model pretrained with caption_mix > 0 has them; the shipped one was not)."""
    words = {w for s in subjects() for w in re.findall(r"[a-z]+", s.prompt.lower())}
    if captions:
        words |= {w for ws in ATTRIBUTE_WORDS.values() for w in ws} | set(FILLER_WORDS) | {"an"}
    return sorted(words)


def write_prompt_files(out_dir: str | Path = "data/prompts") -> list[Path]:
    """Write {concept}.jsonl (keys concept, prompt, split, subject) for every concept; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in CONCEPTS:
        rows = [{"concept": s.concept, "prompt": s.prompt, "split": s.split, "subject": s.subject} for s in subjects(c)]
        path = out_dir / f"{c}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths


def bias(probs: tuple[float, ...]) -> float:
    """METHOD.md section 6's bias of one class-frequency vector: mean |f_i - f_j| over class pairs."""
    k = len(probs)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return float(sum(abs(probs[i] - probs[j]) for i, j in pairs) / len(pairs))


assert set(ATTRIBUTES) == {"gender", "race", "age"}


@functools.lru_cache(maxsize=4)
def _learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` (each counted once) until every word is a single symbol.

    Learning the merges (rather than listing each word's left-to-right chain) is what makes CLIP's BPE, which
    applies merges by rank anywhere in a word, reproduce whole words: the ranks come from the same process.
    """
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda p: (counts[p], p))  # most frequent, ties broken by the pair's text
        merges.append(best)
        joined = best[0] + best[1]
        for k, s in enumerate(segs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[k] = out


def build_word_tokenizer(words: list[str] | None = None, model_max_length: int = 77):
    """A CLIP BPE tokenizer (stock CLIPTokenizer, no download) in which every vocabulary word is one token.

    Vocabulary: the 256 byte symbols (alone and word-final), every merge result, then the start and end
    tokens (so bos = len - 2, eos = pad = len - 1). Unknown words fall back to pieces or single bytes.
    """
    from transformers import CLIPTokenizer

    from fairdiff_ray.models.tiny import _bytes_to_unicode

    words = sorted(set(vocabulary_words() if words is None else words))
    merges = list(_learn_merges(tuple(words)))
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _bytes_to_unicode().values():
            vocab.setdefault(ch + suffix, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
