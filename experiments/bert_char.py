"""A small BERT-style encoder trained with masked-LM on the built-in corpus, characters.

Same blocks as gpt_char.py with causal=False (+ the MLM head): parameter count within 5% of it.
"""

from jaxlm.config import char_comparison_config


def get_config():
    config = char_comparison_config()
    config.model.name = "bert"
    config.model.d_model = 128
    config.model.num_heads = 4
    config.objective.mask_prob = 0.15    # Devlin et al. 2019: 15% selected, 80/10/10
    return config
