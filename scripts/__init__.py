"""Developer tools: the demo, the soak run, the example-workflow and survey generators (python -m scripts.NAME)."""
