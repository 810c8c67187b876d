"""A small GPT on the built-in corpus (the Python standard library), character level: the default experiment.

About 0.43M parameters; trains in a few minutes on 2 CPU cores. The data, token and optimizer set-up is
shared with rnn/lstm/elmo/bert_char.py (config.char_comparison_config), whose models are sized to match it.
"""

from jaxlm.config import char_comparison_config


def get_config():
    config = char_comparison_config()
    config.model.name = "gpt"
    config.model.d_model = 128
    config.model.num_heads = 4
    return config
