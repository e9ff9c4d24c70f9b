"""ctxforge.generation: runs generation requests for every client (synthesis, the judge pass, Self-Lengthen).

    session.py     Generation.open(backend, generator config, cache): the entry point; schedulers are made on it
    scheduler.py   RequestScheduler: cache lookup, priority queue, attempts and seeds, crash resends
    pool.py        EnginePool: long-lived engine actors, grown and shrunk with the queue, replaced when they die
    backends/      one file per backend (hf, vllm, http, fake), each registering itself by name
    validation.py  the JSON-schema check of every answer, then the client's content check
    cache.py       RequestCache: every finished request, persisted at once (resume, reruns)
    requests.py    Request: content-addressed ids, per-attempt seeds, the row an engine receives
    config.py      GeneratorConfig (the `generator` section) and EnginePlacement (shared with serve)
    preflight.py   the generator's checks before any work
    stats.py       PassStats: request statistics per pass name
    accounting.py  engine time and cost for the manifest

The route of a request: client -> scheduler -> pool -> engine -> validation -> cache -> client's callback.
"""
