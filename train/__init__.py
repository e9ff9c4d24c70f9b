"""ctxforge.train: the staged long-context curriculum on Ray Train."""
