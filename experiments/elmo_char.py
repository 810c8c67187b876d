"""ELMo biLM (forward + backward LSTMP stacks, residual, tied softmax) on the built-in corpus, characters.

Sized to within 10% of gpt_char.py's parameter count (tests/test_experiments.py checks it), with the same
data and budget (config.char_comparison_config), so comparisons with the transformer are fair.
"""

from jaxlm.config import char_comparison_config


def get_config():
    config = char_comparison_config()
    config.model.name = "elmo"
    config.model.d_model = 96           # embedding width (tied to the output)
    config.model.hidden_size = 120       # matched to gpt_char's ~0.43M parameters
    return config
