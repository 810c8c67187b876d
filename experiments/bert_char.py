"""A small BERT-style encoder trained with masked-LM on the built-in corpus, characters.

Same blocks as gpt_char.py with causal=False (+ the MLM head): parameter count within 5% of it.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.model.name = "bert"
    config.model.num_layers = 2
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.max_len = 128
    config.data.source = "builtin"
    config.data.tokenizer = "chars"
    config.data.seq_len = 128
    config.objective.mask_prob = 0.15    # Devlin et al. 2019: 15% selected, 80/10/10
    config.train.steps = 1000
    config.train.batch_size = 16
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    return config
