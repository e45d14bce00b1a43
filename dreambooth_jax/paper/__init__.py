"""The DreamBooth paper's protocol, above training and evaluation: for each subject and seed, train, sample
and score (`reproduction`, behind `python -m dreambooth_jax.reproduce`); several runs trained as one
(`parallel_runs`); the trainer command line of a run (`trainer_flags`)."""
