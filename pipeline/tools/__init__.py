"""The commands, as importable code with a ``main``: train, evaluate, predict, export, the memory
planner and plots. ``launch/*.py`` are their few-line entry points."""
