"""ctxforge.serve: Ray Serve OpenAI-compatible endpoint and long-context evaluation."""
