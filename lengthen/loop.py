"""`ctxforge lengthen`: the Self-Lengthen generator/extender loop as explicit, resumable steps on Ray.

Per iteration (OUTPUT/iter_NNN/): self-instruct -> initial responses (generator) -> extension rounds
(extender) -> two training sets -> train the generator and the extender (ctxforge train, one stage) ->
the next iteration starts from the two new checkpoints. After the last iteration every accepted
extension goes into the long-output set (OUTPUT/final/) with word-count suffixes on its queries.

Generation runs through ctxforge.generation (backends hf | vllm | http | fake, the engine pool, the
request scheduler and its cache OUTPUT/work/requests.sqlite); training runs through the training stage on Ray Train. Where the
published scripts killed their servers (`pkill -f`) to end a step, each step here ends when its tasks
are done and writes its output and its entry in OUTPUT/manifest.json. A rerun of a killed run replays
finished steps from the cache (no request sent twice), trains only what is unfinished (finished
stages are never re-run, a killed stage resumes from its last checkpoint), and ends with the same files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ctxforge import __version__
from ctxforge.config import PreflightError
from ctxforge.lengthen import prompts
from ctxforge.lengthen.checks import count_words, drop_short, length_stats
from ctxforge.lengthen.config import LengthenConfig
from ctxforge.lengthen.data import (Extension, extender_messages, generator_messages, sample_row, with_length_suffix,
                                    write_jsonl, write_sample_sets)
from ctxforge.lengthen.tasks import ExtensionTask, InstructionTask, ResponseTask, Role, drive, text_id

log = logging.getLogger(__name__)
ROLES = ("generator", "extender")
LONG_OUTPUT_STAGE = "long_output"


@dataclass
class Preflight:
    model_path: str
    tokenizer: object
    tokenizer_hash: str
    seeds: list[str]


def preflight(cfg: LengthenConfig) -> Preflight:
    """Every input is checked before any work: model, tokenizer, seed file. Errors name the key."""
    from ctxforge.generation.preflight import generator_backend
    from ctxforge.models import load_tokenizer, tokenizer_hash

    gen = cfg.generator
    model_path = generator_backend(gen, ray_address=cfg.runtime.address).model_path
    spec = cfg.tokenizer or gen.model
    try:
        tokenizer = load_tokenizer(spec)
    except Exception as exc:  # an unreadable tokenizer must stop the run before any work
        raise PreflightError(f"{'tokenizer' if cfg.tokenizer else 'generator.model'} {spec!r}: tokenizer could not "
                             f"be loaded: {exc}") from None
    try:
        seeds = prompts.load_instructions(cfg.seeds.path, "seeds.jsonl")
    except ValueError as exc:
        raise PreflightError(f"seeds.path: {exc}") from None
    return Preflight(model_path, tokenizer, tokenizer_hash(tokenizer), seeds)


@dataclass
class Lengthener:
    cfg: LengthenConfig
    label: str = ""
    out: Path = field(init=False)
    manifest: dict = field(init=False)

    def __post_init__(self):
        self.out = Path(self.cfg.output.dir).expanduser().resolve()
        self.generations: dict = {}   # model path -> Generation (ctxforge.generation.session)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _save(self) -> None:
        path = self.out / "manifest.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, path)

    def _step(self, it: int, name: str, record: dict) -> None:
        self.manifest["iterations"][it - 1]["steps"][name] = {"status": "done", **record}
        self._save()

    def _role(self, name: str, model_path: str) -> Role:
        """The role's engines on `model_path`: one engine pool per model, shared by the roles that load it
        (both in the first iteration) and kept until the iteration's generation is over."""
        from ctxforge.generation.backends import make_backend
        from ctxforge.generation.session import Generation

        if model_path not in self.generations:
            gen = self.cfg.generator
            self.generations[model_path] = Generation.open(make_backend(gen, model_path), gen, self.cache)
        generation = self.generations[model_path]
        return Role(name, generation, generation.backend.model_path)

    def _release_engines(self, it: int | None = None) -> None:
        """Shut the iteration's engine pools down (before training needs the CPUs and GPUs); their load, death
        and replacement counts go to the iteration's manifest entry."""
        counts: dict[str, int] = {}
        for generation in self.generations.values():
            generation.close()
            for key, n in generation.pool.counts().items():
                counts[key] = counts.get(key, 0) + n
        self.generations = {}
        if it is not None and counts:
            self.manifest["iterations"][it - 1]["engines"] = counts

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        from ctxforge.generation.cache import RequestCache
        from ctxforge.raycluster import init_ray

        cfg = self.cfg
        started = time.time()
        pre = preflight(cfg)
        self.pre = pre
        (self.out / "work").mkdir(parents=True, exist_ok=True)
        init_ray(cfg.runtime.address, cfg.runtime.num_cpus, cfg.runtime.progress)
        self.cache = RequestCache(self.out / "work" / "requests.sqlite")
        self.manifest = {"ctxforge_version": __version__, "config_source": self.label,
                         "config": cfg.model_dump(mode="json"), "prompt_set_hash": prompts.prompt_set_hash(),
                         "tokenizer_hash": pre.tokenizer_hash, "initial_model": pre.model_path,
                         "iterations": [], "notes": []}
        models = {role: pre.model_path for role in ROLES}
        extensions: list[Extension] = []
        try:
            for it in range(1, cfg.iterations + 1):
                t0 = time.time()
                self.manifest["iterations"].append({"iteration": it, "models": dict(models), "steps": {}})
                idir = self.out / f"iter_{it:03d}"
                instructions = self._instructions(it, idir, models["generator"])
                responses = self._initial(it, idir, models["generator"], instructions)
                accepted = self._extend(it, idir, models["extender"], responses)
                self._release_engines(it)
                extensions += accepted
                data_dir, data = self._data(it, idir, accepted)
                if cfg.train.enabled:
                    for role in ROLES:
                        models[role] = self._train(it, idir, role, models[role], data_dir, data)
                self.manifest["iterations"][-1]["trained_models"] = dict(models)
                self.manifest["iterations"][-1]["wall_s"] = round(time.time() - t0, 1)
                self._save()
            self.manifest["final"] = self._collect(extensions)
        finally:
            self._release_engines()
            self.cache.close()
        sent = sum(s.get("requests", {}).get("sent", 0) for i in self.manifest["iterations"] for s in i["steps"].values())
        self.manifest["requests_sent"] = sent
        self.manifest["final_models"] = models
        self.manifest["wall_s"] = round(time.time() - started, 1)
        self._save()
        return self.manifest

    def _instructions(self, it: int, idir: Path, model: str) -> list[tuple[str, str]]:
        """(instruction_id, instruction) of this iteration."""
        from rapidfuzz import fuzz, process

        cfg, t0 = self.cfg, time.time()
        if cfg.self_instruct.count == 0:
            rows = [(text_id(s), s) for s in self.pre.seeds]
            write_jsonl(idir / "instructions.jsonl", [{"instruction_id": i, "instruction": s} for i, s in rows])
            self._step(it, "self_instruct", {"instructions": len(rows), "source": "seeds"})
            return rows
        tasks = [InstructionTask(cfg, self.pre.seeds, it, i) for i in range(cfg.self_instruct.count)]
        stats = drive(tasks, self._role("generator", model), cfg, f"iteration {it} self-instruct")
        seen = [" ".join(s.lower().split()) for s in self.pre.seeds]
        rows, duplicates = [], 0
        for t in tasks:
            if not t.instruction:
                continue
            norm = " ".join(t.instruction.lower().split())
            if process.extractOne(norm, seen, scorer=fuzz.ratio, score_cutoff=cfg.self_instruct.max_similarity + 1e-9):
                duplicates += 1
                continue
            seen.append(norm)
            rows.append((text_id(t.instruction), t.instruction))
        write_jsonl(idir / "instructions.jsonl", [{"instruction_id": i, "instruction": s} for i, s in rows])
        reasons = _merged(t.reasons for t in tasks)
        self._step(it, "self_instruct", {"wanted": len(tasks), "written": sum(bool(t.instruction) for t in tasks),
                                         "duplicates": duplicates, "instructions": len(rows),
                                         "rejected_tries": dict(reasons), "requests": stats.to_dict(),
                                         "wall_s": round(time.time() - t0, 1)})
        return rows

    def _initial(self, it: int, idir: Path, model: str, instructions: list[tuple[str, str]]) -> list[ResponseTask]:
        cfg, t0 = self.cfg, time.time()
        tasks = [ResponseTask(cfg, iid, text, s) for iid, text in instructions for s in range(cfg.responses.per_instruction)]
        stats = drive(tasks, self._role("generator", model), cfg, f"iteration {it} initial responses")
        ok = [t for t in tasks if t.text]
        words = [count_words(t.text) for t in ok]
        kept = ok
        if cfg.accept.drop_short:
            kept = [ok[i] for i in drop_short(words, f"{cfg.data.seed}:{it}:initial")]
        write_jsonl(idir / "initial.jsonl", [{"response_id": t.response_id, "instruction_id": t.instruction_id,
                                              "instruction": t.instruction, "response": t.text,
                                              "words": count_words(t.text)} for t in kept])
        reasons = _merged(t.reasons for t in tasks)
        self._step(it, "initial", {"wanted": len(tasks), "passed_checks": len(ok), "kept": len(kept),
                                   "dropped_short": len(ok) - len(kept), "rejected_tries": reasons,
                                   "words_all": length_stats(words),
                                   "words": length_stats([count_words(t.text) for t in kept]),
                                   "requests": stats.to_dict(), "wall_s": round(time.time() - t0, 1)})
        return kept

    def _extend(self, it: int, idir: Path, model: str, responses: list[ResponseTask]) -> list[Extension]:
        cfg, t0 = self.cfg, time.time()
        tasks = [ExtensionTask(cfg, r.instruction, r.response_id, r.text, a)
                 for r in responses for a in range(cfg.extend.attempts)]
        stats = drive(tasks, self._role("extender", model), cfg, f"iteration {it} extension")
        ids = {r.response_id: r.instruction_id for r in responses}
        # the iteration in the id: iterations that answer the same instruction (self_instruct.count = 0) must not
        # produce samples with the same id
        done = [Extension(f"it{it}:{t.extension_id}", ids[t.response_id], t.instruction, t.initial, t.extended, it)
                for t in tasks if t.extended]
        a = cfg.accept
        bounded = [e for e in done if (not a.min_words or count_words(e.extended) >= a.min_words)
                   and (not a.max_words or count_words(e.extended) <= a.max_words)]
        kept = bounded
        if a.drop_short:
            kept = [bounded[i] for i in drop_short([count_words(e.extended) for e in bounded],
                                                   f"{cfg.data.seed}:{it}:extended")]
        write_jsonl(idir / "extended.jsonl", [{**e.to_dict(), "initial_words": count_words(e.initial),
                                               "extended_words": count_words(e.extended)} for e in kept])
        rounds_run = sum(t.rounds_run for t in tasks)
        rounds_ok = sum(t.rounds_accepted for t in tasks)
        round_reasons = _merged(t.round_reasons for t in tasks)
        try_reasons = _merged(t.try_reasons for t in tasks)
        tries = sum(t.tries + (1 if t.extended else 0) for t in tasks)
        self._step(it, "extend", {
            "attempts": len(tasks), "accepted": len(done), "attempt_acceptance_rate": _rate(len(done), len(tasks)),
            "tries": tries, "try_acceptance_rate": _rate(len(done), tries),
            "rounds": rounds_run, "rounds_accepted": rounds_ok, "round_acceptance_rate": _rate(rounds_ok, rounds_run),
            "rejected_rounds": round_reasons, "rejected_tries": try_reasons,
            "dropped_word_bounds": len(done) - len(bounded), "dropped_short": len(bounded) - len(kept),
            "kept": len(kept), "words_initial": length_stats([count_words(e.initial) for e in kept]),
            "words_extended": length_stats([count_words(e.extended) for e in kept]),
            "requests": stats.to_dict(), "wall_s": round(time.time() - t0, 1)})
        return kept

    def _data(self, it: int, idir: Path, accepted: list[Extension]) -> tuple[Path, dict]:
        cfg, pre = self.cfg, self.pre
        max_len = cfg.train.stage.max_seq_len
        sets, too_long = {"generator": [], "extender": []}, {"generator": 0, "extender": 0}
        for e in accepted:
            for role, messages in (("generator", generator_messages(e, cfg.data.system_prompt)),
                                   ("extender", extender_messages(e, cfg.data.system_prompt, cfg.data.line_drop,
                                                                  cfg.data.seed))):
                row = sample_row(role, e.extension_id, messages, (e.instruction_id, e.extension_id), pre.tokenizer,
                                 pre.tokenizer_hash, max_len)
                if row is None:
                    too_long[role] += 1
                else:
                    sets[role].append(row)
        data_dir = idir / "data"
        manifest = write_sample_sets(data_dir, sets, cfg.output.rows_per_shard,
                                     {"kind": "lengthen", "iteration": it, "tokenizer_hash": pre.tokenizer_hash})
        self._step(it, "data", {"dir": str(data_dir), "samples": {k: len(v) for k, v in sets.items()},
                                "dropped_too_long": too_long, "max_seq_len": max_len,
                                "content_hash": manifest["content_hash"]})
        return data_dir, manifest

    def _train(self, it: int, idir: Path, role: str, model: str, data_dir: Path, data: dict) -> str:
        """Train `role` from `model` on its set; returns the new checkpoint (or `model` when there is no data).
        The folder is named by the data's content hash, so changed data never reuses a stale checkpoint."""
        from ctxforge.console import follow_training, is_quiet
        from ctxforge.train.config import TrainConfig
        from ctxforge.train.curriculum import run_curriculum

        cfg, t0 = self.cfg, time.time()
        if not data["stages"][role]["samples_built"]:
            note = f"iteration {it}: no {role} samples (no extension accepted); the {role} keeps its weights"
            self.manifest["notes"].append(note)
            self._step(it, f"train_{role}", {"skipped": "no samples", "checkpoint": model})
            return model
        stage = {**cfg.train.stage.model_dump(mode="json"), "name": role, "data_stage": role}
        tc = TrainConfig.model_validate({
            "model": model, "input": {"path": str(data_dir)},
            "output": {"dir": str(idir / "train" / f"{role}-{data['content_hash'][:8]}"), "name": f"lengthen-{role}"},
            "runtime": cfg.train.runtime.model_dump(mode="json"), "stages": [stage]})
        # quiet console: a line per training step from rank 0's metrics rows (the workers' output is in Ray's logs)
        with follow_training(Path(tc.output.dir) / "metrics") if is_quiet() else nullcontext():
            report = run_curriculum(tc, label=f"lengthen iteration {it} {role}", log=log.info,
                                    ray_address=cfg.runtime.address)
        st = report.stages[role]
        self._step(it, f"train_{role}", {"status_train": st["status"], "checkpoint": st["checkpoint"],
                                         "steps": st.get("steps"), "loss": st.get("loss"),
                                         "wall_s": round(time.time() - t0, 1)})
        return st["checkpoint"]

    def _collect(self, extensions: list[Extension]) -> dict:
        """The long-output set: every accepted extension, its query with a word-count suffix (seeded)."""
        cfg, pre = self.cfg, self.pre
        lc = cfg.length_control
        rows, constraints, too_long = [], {}, 0
        for e in extensions:
            query, c = with_length_suffix(e, lc.probability, lc.type_weights, cfg.data.seed)
            constraints[c.get("type", "none")] = constraints.get(c.get("type", "none"), 0) + 1
            row = sample_row(LONG_OUTPUT_STAGE, e.extension_id, generator_messages(e, cfg.data.system_prompt, query),
                             (e.instruction_id, e.extension_id), pre.tokenizer, pre.tokenizer_hash,
                             cfg.train.stage.max_seq_len)
            if row is None:
                too_long += 1
            else:
                rows.append(row)
        manifest = write_sample_sets(self.out / "final", {LONG_OUTPUT_STAGE: rows}, cfg.output.rows_per_shard,
                                     {"kind": "lengthen-long-output", "tokenizer_hash": pre.tokenizer_hash})
        if not rows:
            self.manifest["notes"].append("no extension was accepted in any iteration: the long-output set is empty")
        return {"dir": str(self.out / "final"), "stage": LONG_OUTPUT_STAGE, "samples": len(rows),
                "dropped_too_long": too_long, "length_constraints": constraints,
                "words": length_stats([count_words(e.extended) for e in extensions]),
                "content_hash": manifest["content_hash"]}


def _merged(counters) -> dict:
    total = Counter()
    for c in counters:
        total.update(c)
    return dict(total)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def run_lengthen(cfg: LengthenConfig, label: str = "") -> dict:
    """Run (or resume) the loop; returns the manifest written to OUTPUT/manifest.json."""
    return Lengthener(cfg, label).run()
