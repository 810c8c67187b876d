"""stacked LSTM LM (forget-gate bias 1) on the built-in corpus, characters.

Sized to within 10% of gpt_char.py's parameter count (tests/test_experiments.py checks it), with the same
data and budget (config.char_comparison_config), so comparisons with the transformer are fair.
"""

from jaxlm.config import char_comparison_config


def get_config():
    config = char_comparison_config()
    config.model.name = "lstm"
    config.model.d_model = 128           # embedding width (tied to the output)
    config.model.hidden_size = 160       # matched to gpt_char's ~0.43M parameters
    config.train.stateful = True         # truncated BPTT over contiguous streams (Zaremba et al. 2014)
    return config
