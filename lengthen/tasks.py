"""The generation steps of one iteration as small state machines, clients of the generation layer.

Each task (one wanted instruction, one initial response, one extension attempt) has at most one
request out at a time and advances on its answer. `drive` hands every task's request to a request
scheduler on the role's engine pool (cache first, then the engines) and, as each answer comes back,
feeds it to its task and asks that task's next request, until no task wants more. A task's state
depends only on its own answers and the config, so the requests made (and the outputs) do not depend
on the order in which answers arrive; a rerun replays them from the request cache and sends nothing,
and a killed run loses at most the answers of one poll.

A task distinguishes its tries by the request key (`initial:s1:t2`), which enters the request id: a
retry is a new request with its own sampling seed, and a rerun asks the same ones.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from ctxforge.lengthen import prompts
from ctxforge.lengthen.checks import check_text, count_words, split_paragraphs
from ctxforge.lengthen.config import LengthenConfig
from ctxforge.generation.requests import Request
from ctxforge.generation.session import Generation
from ctxforge.generation.stats import PassStats


log = logging.getLogger(__name__)


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _messages(cfg: LengthenConfig, user: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    return system + [{"role": "user", "content": user}]


@dataclass
class Role:
    """One role's engines for this iteration: the generation (engine pool + cache) on the model it loads."""

    name: str                # generator | extender
    generation: Generation
    model: str               # resolved model path (or served name for http): part of every request id


def drive(tasks: list, role: Role, cfg: LengthenConfig, label: str) -> PassStats:
    """Advance every task on its own answers until all are done; returns the requests' statistics."""
    gen = cfg.generator
    version = prompts.prompt_set_hash()
    scheduler = role.generation.scheduler()

    def ask(rank: int, task) -> None:
        req = None if task.done else task.next_request()
        if req is None:
            return
        # the key (try / round / step) makes each try its own content-addressed request
        req.finalize(role.model, gen.temperature, gen.top_p, f"{version}|{req.key}", gen.repetition_penalty)
        scheduler.ask([req], rank, lambda _req, answer: (task.feed(answer), ask(rank, task)))

    for rank, task in enumerate(tasks):
        ask(rank, task)
    log.info("%s (%s): %d tasks", label, role.name, len(tasks))
    scheduler.run()
    stats = PassStats()
    for st in scheduler.finish().values():
        stats.merge(st)
    return stats


@dataclass
class InstructionTask:
    """Self-instruct one new long-writing instruction (optionally judged), retrying up to max_tries."""

    cfg: LengthenConfig
    seeds: list[str]
    iteration: int
    index: int
    tries: int = 0
    phase: str = "write"           # write | judge
    candidate: str = ""
    instruction: str = ""          # the result ("" = none)
    done: bool = False
    reasons: Counter = field(default_factory=Counter)

    def next_request(self) -> Request:
        si = self.cfg.self_instruct
        key = f"instruct:{self.index}:t{self.tries}"
        if self.phase == "judge":
            return Request("judge_instruction", f"it{self.iteration}:{self.index}", key + ":judge",
                           _messages(self.cfg, prompts.JUDGE_INSTRUCTION.format(instruction=self.candidate)),
                           "judge", prompts.JUDGE_SCHEMA, 16)
        rng = random.Random(f"self_instruct:{self.cfg.data.seed}:{self.iteration}:{self.index}:{self.tries}")
        examples = rng.sample(self.seeds, min(si.examples, len(self.seeds)))
        listed = "\n".join(f"{n}. {e}" for n, e in enumerate(examples, 1))
        user = prompts.SELF_INSTRUCT.format(examples=listed, topic=rng.choice(prompts.TOPICS))
        return Request("self_instruct", f"it{self.iteration}:{self.index}", key, _messages(self.cfg, user),
                       "instruction", prompts.instruction_schema(si.max_chars), si.max_tokens)

    def feed(self, answer: dict | None) -> None:
        si = self.cfg.self_instruct
        if self.phase == "judge":
            self.phase = "write"
            if answer is not None and answer.get("suitable") is True:
                self.instruction, self.done = self.candidate, True
                return
            return self._retry("judged_unsuitable" if answer is not None else "request_failed")
        if answer is None:
            return self._retry("request_failed")
        text = " ".join(answer["instruction"].split())
        words = count_words(text)
        if not si.min_words <= words <= si.max_words:
            return self._retry("word_count")
        if si.judge:
            self.candidate, self.phase = text, "judge"
            return
        self.instruction, self.done = text, True

    def _retry(self, reason: str) -> None:
        self.reasons[reason] += 1
        self.tries += 1
        self.done = self.tries >= self.cfg.self_instruct.max_tries


@dataclass
class ResponseTask:
    """One initial response of the generator to an instruction, retried until it passes the checks."""

    cfg: LengthenConfig
    instruction_id: str
    instruction: str
    sample: int
    tries: int = 0
    text: str = ""
    done: bool = False
    reasons: Counter = field(default_factory=Counter)

    @property
    def response_id(self) -> str:
        return f"{self.instruction_id}:s{self.sample}"

    def next_request(self) -> Request:
        c = self.cfg
        return Request("initial_response", self.instruction_id, f"initial:s{self.sample}:t{self.tries}",
                       _messages(c, self.instruction), "text", None, c.responses.max_tokens)

    def feed(self, answer: dict | None) -> None:
        reason = "request_failed"
        if answer is not None:
            text = prompts.answer_text(answer)
            reason = check_text(text, self.cfg.checks.repeat_ngram, self.cfg.checks.end_punctuation)
            if not reason:
                self.text, self.done = text, True
                return
        self.reasons[reason] += 1
        self.tries += 1
        self.done = self.tries >= self.cfg.responses.max_tries


def round_verdict(candidate: str, best_words: int, repeat_ngram: int, end_punctuation: bool) -> str:
    """Acceptance of one extension round: "" when `candidate` passes the checks and has more words than the
    best text so far, else the reason (truncated, repetitive, empty, not_longer)."""
    reason = check_text(candidate, repeat_ngram, end_punctuation)
    if reason:
        return reason
    return "" if count_words(candidate) > best_words else "not_longer"


def extension_verdict(initial_words: int, final_words: int, min_ratio: float) -> str:
    """Acceptance of a finished try: "" when the final text has more than min_ratio x the initial words."""
    return "" if final_words > min_ratio * initial_words else "under_ratio"


@dataclass
class ExtensionTask:
    """One extension attempt of an initial response by the extender: up to max_tries tries of `rounds`
    rounds each; a round extends the first half of the current paragraphs, keeps the first keep_fraction
    of that, and has the rest completed against the whole current text."""

    cfg: LengthenConfig
    instruction: str
    response_id: str
    initial: str
    attempt: int
    tries: int = 0
    round: int = 0
    phase: str = "former"          # former | latter
    current: str = ""
    best: str = ""
    kept: list[str] = field(default_factory=list)
    done: bool = False
    extended: str = ""             # the accepted extension ("" = none)
    rounds_run: int = 0
    rounds_accepted: int = 0
    round_reasons: Counter = field(default_factory=Counter)
    try_reasons: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.current = self.best = self.initial

    @property
    def extension_id(self) -> str:
        return f"{self.response_id}:a{self.attempt}"

    def next_request(self) -> Request:
        c = self.cfg
        key = f"extend:a{self.attempt}:t{self.tries}:r{self.round}:{self.phase}"
        if self.phase == "former":
            paragraphs = split_paragraphs(self.current)
            draft = "\n\n".join(paragraphs[:max(1, len(paragraphs) // 2)])
            user = prompts.extend_prompt(self.instruction, draft)
        else:
            user = prompts.COMPLETE.format(instruction=self.instruction, draft=self.current,
                                           beginning="\n\n".join(self.kept))
        return Request("extend_" + self.phase, self.response_id, key, _messages(c, user), "text", None,
                       c.extend.max_tokens)

    def feed(self, answer: dict | None) -> None:
        if self.phase == "former":
            if answer is None:
                return self._end_round("request_failed")
            paragraphs = split_paragraphs(prompts.answer_text(answer))
            if not paragraphs:
                return self._end_round("empty")
            self.kept = paragraphs[:max(1, int(len(paragraphs) * self.cfg.extend.keep_fraction))]
            self.phase = "latter"
            return
        if answer is None:
            return self._end_round("request_failed")
        candidate = "\n\n".join([*self.kept, prompts.answer_text(answer)]).strip()
        verdict = round_verdict(candidate, count_words(self.best), self.cfg.checks.repeat_ngram,
                                self.cfg.checks.end_punctuation)
        if not verdict:
            self.current = self.best = candidate
        self._end_round(verdict)

    def _end_round(self, verdict: str) -> None:
        self.rounds_run += 1
        if verdict:
            self.round_reasons[verdict] += 1
        else:
            self.rounds_accepted += 1
        self.phase, self.kept = "former", []
        self.round += 1
        if self.round < self.cfg.extend.rounds:
            return
        reason = extension_verdict(count_words(self.initial), count_words(self.best), self.cfg.extend.min_ratio)
        if not reason:
            self.extended, self.done = self.best, True
            return
        self.try_reasons[reason] += 1
        self.tries += 1
        self.round, self.current, self.best = 0, self.initial, self.initial
        self.done = self.tries >= self.cfg.extend.max_tries
