"""A small GPT on the built-in corpus (the Python standard library), character level: the default experiment.

About 0.4M parameters; trains in a few minutes on 2 CPU cores to ~1.5 nats/char on held-out stdlib code.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.model.name = "gpt"
    config.model.num_layers = 2       # small enough for a laptop CPU, deep enough to form induction heads
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.max_len = 128
    config.data.source = "builtin"
    config.data.tokenizer = "chars"   # one token per character of the stdlib sources
    config.data.seq_len = 128
    config.train.steps = 1000
    config.train.batch_size = 16
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    return config
