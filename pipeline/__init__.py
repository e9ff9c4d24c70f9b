"""ctxforge.pipeline: the synthesis stage (read -> chunk -> generate -> ground -> concatenate -> write)."""
