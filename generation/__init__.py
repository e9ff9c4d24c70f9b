"""ctxforge.generation: runs generation requests for every client (synthesis, Self-Lengthen, the judge)."""
