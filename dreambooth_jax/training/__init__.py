"""DreamBooth training: options and presets (`config`), data and batches (`data`, `inputs`), class images, the
train state and optimizers, the pure train step (`step`), Orbax checkpoints, the loop, export, and
`trainer.run`."""
