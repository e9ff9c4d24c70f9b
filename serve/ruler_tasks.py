"""RULER's 13 tasks, generated here to any length with the served model's tokenizer.

Each task is a builder `(n, rng) -> (input, answer_prefix, golds, depths)` where n is the size of its
filler (essay words, noise lines, distractor needles, list words, documents). As in RULER, n is found
once per (task, length) by search so that `tokens(chat template(input + answer_prefix)) +
tokens_to_generate <= length`, then lowered per sample until that sample fits. Prompt templates,
answer prefixes, needle formats, frequencies and tokens_to_generate are RULER's (scripts/synthetic.yaml,
scripts/data/synthetic/*.py). Deliberate differences, none of which changes what a task asks or how it is scored: every sample
draws from its own Random seeded by (seed, task, length, index), so a sample can be rebuilt alone and
is the same in every process; essay needles go at the sentence boundary nearest to depth % of the
characters (RULER: sentence index len(sentences) x depth, which drifts when sentences vary in length);
sentences are split by a rule instead of NLTK punkt (its data is not on PyPI).
This module knows nothing about HTTP or scoring (ruler_metrics.py).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import string
from dataclasses import asdict, dataclass, field
from typing import Callable

from ctxforge.serve import ruler_data as rd

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
               "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
               "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_PREFIX = " Answer:"

# RULER's scripts/synthetic.yaml
TASKS: dict[str, dict] = {
    "niah_single_1": dict(family="niah", haystack="noise", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_single_2": dict(family="niah", haystack="essay", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_single_3": dict(family="niah", haystack="essay", k="words", v="uuids", nk=1, nv=1, nq=1),
    "niah_multikey_1": dict(family="niah", haystack="essay", k="words", v="numbers", nk=4, nv=1, nq=1),
    "niah_multikey_2": dict(family="niah", haystack="needle", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_multikey_3": dict(family="niah", haystack="needle", k="uuids", v="uuids", nk=1, nv=1, nq=1),
    "niah_multivalue": dict(family="niah", haystack="essay", k="words", v="numbers", nk=1, nv=4, nq=1),
    "niah_multiquery": dict(family="niah", haystack="essay", k="words", v="numbers", nk=4, nv=1, nq=4),
    "vt": dict(family="vt", num_chains=1, num_hops=4),
    "cwe": dict(family="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(family="fwe", alpha=2.0),
    "qa_1": dict(family="qa", dataset="squad"),
    "qa_2": dict(family="qa", dataset="hotpotqa"),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
# Filler growth step (RULER's `incremental`): essay words, noise lines, list words, documents.
INCREMENT = {"essay": 500, "noise": 25, "needle": 25, "vt": 10, "cwe": 10, "fwe": 50, "qa": 10}


@dataclass
class RulerSample:
    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: list[str]
    tokens_to_generate: int
    prompt_tokens: int
    depths: list[float] = field(default_factory=list)  # needle depths in % of the context (NIAH only)

    def to_dict(self) -> dict:
        return asdict(self)


class PromptSizer:
    """Counts a prompt's tokens exactly as the endpoint will see it: the chat template applied to the
    user turn `input` and an assistant turn that continues `answer_prefix`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, text: str, prefix: str) -> int:
        tok = self.tokenizer
        if tok.chat_template:
            msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": prefix}]
            return len(tok.apply_chat_template(msgs, continue_final_message=True, return_dict=True)["input_ids"])
        return len(tok.encode(text + prefix, add_special_tokens=False))


@dataclass
class RulerSources:
    haystack: str = "builtin:kjv"
    squad_path: str | None = None
    hotpotqa_path: str | None = None

    def qa(self, dataset: str):
        path = self.squad_path if dataset == "squad" else self.hotpotqa_path
        return (rd.read_squad if dataset == "squad" else rd.read_hotpotqa)(path)

    def skipped(self, task: str) -> str | None:
        """Why a task cannot run with these sources (None = it can)."""
        spec = TASKS[task]
        if spec["family"] == "qa":
            key = "squad_path" if spec["dataset"] == "squad" else "hotpotqa_path"
            if getattr(self, key) is None:
                return f"ruler.{key} is not set ({'SQuAD v2 dev' if spec['dataset'] == 'squad' else 'HotpotQA dev distractor'} JSON)"
        return None


def _niah_builder(spec: dict, sources: RulerSources, depth: float | None) -> Callable:
    words = rd.essay_words(sources.haystack) if spec["haystack"] == "essay" else None

    def build(n: int, rng: random.Random):
        keys, values, needles = [], [], []
        for _ in range(spec["nk"]):
            keys.append(rd.random_value(spec["k"], rng))
            vals = [rd.random_value(spec["v"], rng) for _ in range(spec["nv"])]
            values.append(vals)
            needles += [NEEDLE.format(type_needle_v=spec["v"], key=keys[-1], value=v) for v in vals]
        rng.shuffle(needles)
        controlled = depth is not None and len(needles) == 1
        if spec["haystack"] == "essay":
            sents = rd.split_sentences(" ".join(rd.take_words(words, n)))
            depths = sorted([depth] if controlled else rng.sample(rd.DEPTHS, len(needles)))
            # RULER cuts at sentence index len(sents) * d; sentences vary in length (KJV verses especially),
            # so cut at the sentence boundary nearest to d % of the characters: the needle lands at its depth.
            ends = list(itertools.accumulate(len(x) + 1 for x in sents))
            cuts = [0] + [bisect.bisect_left(ends, ends[-1] * d / 100) + (d > 0) for d in depths] + [len(sents)]
            cuts = [min(c, len(sents)) for c in cuts]
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i < len(cuts) - 1:
                    pieces.append(needles[i - 1])
            context = " ".join(p for p in pieces if p)
        else:
            if spec["haystack"] == "noise":
                lines = [rd.NOISE] * n
            else:  # distractor needles with random keys and values
                lines = [NEEDLE.format(type_needle_v=spec["v"], key=rd.random_value(spec["k"], rng),
                                       value=rd.random_value(spec["v"], rng)) for _ in range(n)]
            idx = [round(depth / 100 * n)] if controlled else sorted(rng.sample(range(n), len(needles)), reverse=True)
            for i, needle in zip(idx, needles):
                lines.insert(i, needle)
            context = "\n".join(lines)
            total = len(lines)
            depths = sorted(100.0 * lines.index(nd) / max(total - 1, 1) for nd in needles)
        picked = rng.sample(range(spec["nk"]), spec["nq"])
        queries = [keys[i] for i in picked]
        golds = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, spec["v"]
        if spec["nq"] * spec["nv"] == 1:  # RULER makes the question singular
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prefix = prefix.replace("are", "is")
            type_v = type_v[:-1]
        return (template.format(type_needle_v=type_v, context=context, query=query),
                prefix.format(type_needle_v=type_v, query=query), golds, [float(d) for d in depths])
    return build


VT_ICL_TOKENS = 500  # RULER sizes its one-shot vt example to 500 tokens (variable_tracking.py main())
VT_ICL_VALUE = "12345"


def _vt_context(n: int, rng: random.Random, num_chains: int, num_hops: int, name_len: int, value: str | None = None):
    """RULER's noise context for vt: n noise lines joined by a newline, each chain's assignments inserted
    in order at sorted random positions. Returns (context, queried value, the first chain's variables)."""
    names: list[str] = []
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append(rd.var_name(rng, name_len))
    names = list(dict.fromkeys(names))
    chains, chain_vars = [], []
    for c in range(num_chains):
        vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain_vars.append(vs)
        first = value if value is not None else str(rng.randrange(10000, 99999))  # np.random.randint(10000, 99999)
        chains.append([f"VAR {vs[0]} = {first}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)])
    lines = [rd.NOISE] * n
    for chain in chains:
        for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return context, chains[0][0].split("=")[-1].strip(), chain_vars[0]


def vt_icl_example(spec: dict, seed: int, count_tokens: Callable[[str], int]) -> str:
    """RULER's one-shot vt example, built once per dataset: 3-letter variables, value 12345, the most noise
    lines (searched from 5) that keep template + answer prefix within 500 tokens of the model's tokenizer,
    then the answer: `<input> <VAR1 ... VAR5>\n`."""
    hops, chains = min(10, spec["num_hops"]), spec["num_chains"]

    def build(n: int):
        ctx, query, names = _vt_context(n, random.Random(f"ruler:{seed}:vt:icl"), chains, hops, 3, VT_ICL_VALUE)
        return VT_TEMPLATE.format(context=ctx, query=query) + VT_PREFIX.format(num_v=hops + 1, query=query), names

    n = _largest_fitting(lambda m: count_tokens(build(m)[0]), VT_ICL_TOKENS, 5, None, "RULER vt one-shot example")
    text, names = build(n)
    return text + " " + " ".join(names) + "\n"


def _randomize_icl(example: str, rng: random.Random, num_hops: int) -> str:
    """RULER's randomize_icl: new names of the same length for the answer's variables, a new value."""
    for name in example.strip().split()[-num_hops - 1:]:
        example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    return example.replace(VT_ICL_VALUE, str(rng.randrange(10000, 99999)))


def _vt_builder(spec: dict, icl_example: str) -> Callable:
    hops, chains = spec["num_hops"], spec["num_chains"]

    def build(n: int, rng: random.Random):
        example = _randomize_icl(icl_example, rng, min(10, hops))
        context, query, golds = _vt_context(n, rng, chains, hops, 5)
        return (example + "\n" + VT_TEMPLATE.format(context=context, query=query),
                VT_PREFIX.format(num_v=hops + 1, query=query), golds, [])
    return build


def _cwe_builder(spec: dict, length: int, seed: int) -> Callable:
    vocab, n_base = rd.cwe_vocabulary(seed)
    short = length < 4096  # RULER lowers the frequencies below 4K

    def listing(rng, num_words, freq_cw, freq_ucw):
        # RULER draws from wonderwords' words; the overflow list only when more distinct words are needed.
        words = rng.sample(vocab[:max(n_base, num_words)], num_words)
        common, uncommon = words[:spec["num_cw"]], words[spec["num_cw"]:]
        seq = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(seq)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)), common

    def build(n: int, rng: random.Random):
        ex_ctx, ex_ans = listing(rng, 20, 3, 1) if short else listing(rng, 40, 10, 3)
        ctx, golds = listing(rng, n, 6, 1) if short else listing(rng, n, spec["freq_cw"], spec["freq_ucw"])
        example = (CWE_TEMPLATE.format(context=ex_ctx) + CWE_PREFIX + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)))
        return example + "\n" + CWE_TEMPLATE.format(context=ctx), CWE_PREFIX, golds, []
    return build


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi ** 2 / 6
    terms = 100_000  # sum + integral tail
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def _fwe_builder(spec: dict, length: int) -> Callable:
    vocab_size = max(length // 50, 10)

    def build(n: int, rng: random.Random):
        vocab: list[str] = []
        while len(set(vocab)) < vocab_size:
            vocab.append(rd.coded_word(rng))
        vocab = sorted(set(vocab))
        rng.shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        z = _zeta(spec["alpha"])
        seq = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -spec["alpha"] / z))]
        rng.shuffle(seq)
        return FWE_TEMPLATE.format(context=" ".join(seq)), FWE_PREFIX, vocab[1:4], []
    return build


def _qa_builder(spec: dict, sources: RulerSources, index: int):
    qas, docs = sources.qa(spec["dataset"])
    item = qas[index % len(qas)]

    def build(n: int, rng: random.Random):
        gold, more = item["context"], item["more_context"]
        if n >= len(docs):
            # More documents than the dataset has (SQuAD dev is ~180K tokens): every document once, then
            # distractors again in a shuffled cycle (RULER main also repeats the corpus to reach long lengths).
            others = [i for i in range(len(docs)) if i not in set(gold)]
            rng.shuffle(others)
            chosen = list(range(len(docs))) + [others[k % len(others)] for k in range(n - len(docs))]
        elif n - len(gold) > len(more):
            rest = [i for i in range(len(docs)) if i not in set(gold) | set(more)]
            chosen = gold + more + rng.sample(rest, max(0, n - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, max(0, n - len(gold)))
        texts = [docs[i] for i in chosen]
        rng.shuffle(texts)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(texts))
        return QA_TEMPLATE.format(context=context, query=item["query"]), QA_PREFIX, list(item["outputs"]), []
    return build, None


def _unit(task: str) -> str:
    spec = TASKS[task]
    return spec["haystack"] if spec["family"] == "niah" else spec["family"]


def _largest_fitting(count_at: Callable[[int], int], budget: int, step: int, cap: int | None, what: str,
                     start: int | None = None) -> int:
    """Largest n (<= cap) with count_at(n) <= budget; count_at grows with n.

    Without `start`: estimate from the slope at the smallest sizes, bracket, bisect (RULER's search).
    With `start` (a size that fit sample 0): step down by `step` until it fits, then bisect upwards."""
    if start is not None:
        lo, hi = start, start + 1
        while count_at(lo) > budget:
            lo, hi = lo - step, lo
            if lo < 1:
                lo = 1
                if count_at(lo) > budget:
                    raise ValueError(f"{what}: does not fit even with a filler of 1 unit")
                break
    else:
        lo = step if cap is None else min(step, cap)
        while lo > 1 and count_at(lo) > budget:  # short lengths: below one RULER increment
            lo //= 2
        first = count_at(lo)
        if first > budget:
            raise ValueError(f"{what}: the prompt needs {first} tokens with the smallest filler > budget {budget}")
        slope = max((count_at(2 * lo) - first) / lo, 1e-3)
        hi = max(lo + 1, lo + int((budget - first) / slope * 1.05))
        if cap is not None:
            hi = min(hi, cap)
        while count_at(hi) <= budget:  # the estimate was low: grow until it does not fit
            lo, hi = hi, int(hi * 1.25) + step
            if cap is not None and hi >= cap:
                if count_at(cap) <= budget:
                    return cap
                hi = cap
                break
        guess = lo + int((budget - first) / slope * 0.97)
        if lo < guess < hi and count_at(guess) <= budget:
            lo = guess
    if cap is not None and lo >= cap:
        return cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_at(mid) <= budget else (lo, mid)
    return lo


def generate_task(task: str, length: int, num_samples: int, seed: int, sizer: PromptSizer,
                  sources: RulerSources, depths: list[float] | None = None) -> list[RulerSample]:
    """`num_samples` samples of `task` that each fit `length` tokens (prompt + tokens to generate).

    Raises ValueError for a task not in TASKS, one whose sources are missing (the reason stated), or a `length`
    that even the smallest filler does not fit (both counts stated).
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {list(TASKS)}")
    reason = sources.skipped(task)
    if reason:
        raise ValueError(f"RULER task {task} cannot run: {reason}")
    spec, unit = TASKS[task], _unit(task)
    to_generate = TOKENS_TO_GENERATE[spec["family"]]
    budget = length - to_generate
    step = INCREMENT[unit]

    def builder_for(index: int):
        if spec["family"] == "niah":
            d = depths[index % len(depths)] if depths else None
            return _niah_builder(spec, sources, d), None
        if spec["family"] == "vt":
            return _vt_builder(spec, icl), None
        if spec["family"] == "cwe":
            return _cwe_builder(spec, length, seed), len(rd.cwe_vocabulary(seed)[0])
        if spec["family"] == "fwe":
            return _fwe_builder(spec, length), None
        return _qa_builder(spec, sources, index)

    def rng_for(index: int) -> random.Random:
        return random.Random(f"ruler:{seed}:{task}:{length}:{index}")

    def count(build, n, index):
        text, prefix, _, _ = build(n, rng_for(index))
        return sizer.count(text, prefix)

    icl = None
    if spec["family"] == "vt":
        icl = vt_icl_example(spec, seed, lambda text: len(sizer.tokenizer.encode(text, add_special_tokens=False)))
    build0, cap = builder_for(0)
    n_task = _largest_fitting(lambda n: count(build0, n, 0), budget, step, cap, f"RULER {task} at length {length}")
    samples = []
    for index in range(num_samples):
        build, cap_i = builder_for(index)
        n = min(n_task, cap_i) if cap_i is not None else n_task
        text, prefix, golds, ds = build(n, rng_for(index))
        tokens = sizer.count(text, prefix)
        if tokens > budget:  # this sample's draws are longer than sample 0's: shrink it just enough
            n = _largest_fitting(lambda m: count(build, m, index), budget, step, cap_i,
                                 f"RULER {task} sample {index} at length {length}", start=n)
            text, prefix, golds, ds = build(n, rng_for(index))
            tokens = sizer.count(text, prefix)
        samples.append(RulerSample(task, length, index, text, prefix, golds, to_generate, tokens, ds))
    return samples
