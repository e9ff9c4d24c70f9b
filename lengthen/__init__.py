"""ctxforge.lengthen: Self-Lengthen (Quan et al. 2024) as a ctxforge mode — long outputs from the model itself.

config.py (LengthenConfig) · prompts.py (prompts, schemas, seed instructions) · checks.py (word counts,
truncation/repetition checks, drop_short) · tasks.py (self-instruct / initial / extension steps as state
machines, clients of ctxforge.generation) · data.py (Generator / Extender / long-output sets in the
sample contract) · length_control.py (word-count suffixes, LonGen length score) · loop.py (iterations,
training both roles, manifest) · command.py (CLI). The long-output evaluation of `ctxforge eval` is
serve/eval_longgen.py (it uses length_control and checks from here).
"""
