"""A training run: validate the experiment, build its parts, the train step, the loop
(``trainer``) and tracking (metrics file, W&B)."""
