"""The training pipeline: MegDet and AGVM on DeepSpeed, one subpackage per concern.

Imports point one way: a module imports from its own layer or from lower ones, never from a
higher one (``tests/test_layout.py`` checks it). From the bottom:

    errors, config   what a user fixes, and the typed experiment config
    utils            logging, memory, the host-sync counter
    data             COCO annotations, dataset, samplers, loaders, the synthetic set
    distributed      launcher, process group, DeepSpeed config/engine/internals, cross-GPU BN
    optim            param groups and optimizers, MegDet schedule, AGVM, EMA
    checkpoint       save/choose/prune, resharding
    evaluation       inference, COCOeval, previews
    train            validate, build, step, trainer, tracking
    tools            the commands: train, evaluate, predict, export, planner, plots
    studies          scaling studies

``models`` (the detectors) sits below all of them and imports nothing from ``pipeline``.
"""

# The layer order above, for the test; a layer may import only from itself and the ones before it.
LAYERS = ("errors", "config", "utils", "data", "distributed", "optim", "checkpoint", "evaluation", "train", "tools",
          "studies")
