"""Chunking throughput relative to the bare tokenizer, on the King James Bible as one long document.

chunk_document tokenizes once and then only does boundary bookkeeping, so its throughput should sit
close to the tokenizer's own (ratio near 1.0); a ratio well below that means the boundary search or
record building has become the bottleneck. Both are timed side by side in one process, best of N.

    .venv/bin/python bench/bench_chunking.py [--small-tokens 4096] [--repeats 3] [--books 0] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from ctxforge.models import load_tokenizer
from ctxforge.pipeline.chunking import chunk_document
from ctxforge.pipeline.read import kjv_source_file
from smoke_sizes import parse_args


def kjv_text(path: pathlib.Path, books: int = 0) -> str:
    """Verses joined by spaces, chapters by blank lines, books by two blank lines."""
    out: list[list[list[str]]] = []
    last_book, last_chapter = None, None
    with path.open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            if v["book"] != last_book:
                if books and len(out) == books:
                    break
                out.append([])
                last_book, last_chapter = v["book"], None
            if v["chapter"] != last_chapter:
                out[-1].append([])
                last_chapter = v["chapter"]
            out[-1][-1].append(v["text"])
    return "\n\n\n".join("\n\n".join(" ".join(ch) for ch in book) for book in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-tokens", type=int, default=4096)
    ap.add_argument("--smalls-per-medium", type=int, default=3)
    ap.add_argument("--boundary-window", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--books", type=int, default=0, help="first N books only (0 = the whole Bible)")
    args = parse_args(ap, {"books": 1, "repeats": 1})

    tok = load_tokenizer("ctxforge:tiny")
    text = kjv_text(kjv_source_file(), args.books)

    def raw():
        return len(tok(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)["input_ids"])

    def chunked():
        return chunk_document("kjv", text, tok, args.small_tokens, args.smalls_per_medium, args.boundary_window)

    n_tokens = raw()  # warm-up, and the token count both rates divide by
    chunks, sections, n = chunked()
    assert n == n_tokens

    best_raw = best_chunk = float("inf")
    for _ in range(args.repeats):  # alternated so drift (thermal, other load) hits both alike
        t0 = time.perf_counter()
        raw()
        t1 = time.perf_counter()
        chunked()
        t2 = time.perf_counter()
        best_raw, best_chunk = min(best_raw, t1 - t0), min(best_chunk, t2 - t1)

    at_paragraph = sum(c.text.endswith("\n\n") for c in chunks[:-1])
    print(f"text: {len(text):,} chars, {n_tokens:,} tokens; {len(chunks)} chunks "
          f"({at_paragraph} cut at paragraph ends), {len(sections)} sections; "
          f"small_tokens={args.small_tokens} window={args.boundary_window}")
    print(f"tokenizer (encode + offsets): {n_tokens / best_raw:,.0f} tokens/s  ({best_raw:.3f} s, best of {args.repeats})")
    print(f"chunk_document:               {n_tokens / best_chunk:,.0f} tokens/s  ({best_chunk:.3f} s, best of {args.repeats})")
    print(f"throughput ratio chunking/tokenizer: {best_raw / best_chunk:.3f}")


if __name__ == "__main__":
    main()
