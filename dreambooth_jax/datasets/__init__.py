"""Datasets as TensorFlow Datasets builders: `dreambooth`, the DreamBooth paper's 30 subjects.
Imported only where a dataset is used (`--dataset`, the evaluation, the paper's protocol): TFDS is heavy."""
