"""stacked LSTM LM (forget-gate bias 1) on the built-in corpus, characters.

Sized to within 10% of gpt_char.py's parameter count (tests/test_experiments.py checks it), so comparisons
with the transformer are at matched capacity.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.model.name = "lstm"
    config.model.num_layers = 2
    config.model.d_model = 128           # embedding width (tied to the output)
    config.model.hidden_size = 160       # matched to gpt_char's ~0.43M parameters
    config.model.max_len = 128
    config.data.source = "builtin"
    config.data.tokenizer = "chars"
    config.data.seq_len = 128
    config.train.stateful = True     # truncated BPTT over contiguous streams (Zaremba et al. 2014)
    config.train.steps = 1000
    config.train.batch_size = 16
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    return config
