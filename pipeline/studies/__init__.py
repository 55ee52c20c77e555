"""Scaling studies: the study file (``spec``), the runner behind ``launch/study.py`` (``runner``)
and the model-size sweep (``model_size``)."""
