"""ELMo biLM (forward + backward LSTMP stacks, residual, tied softmax) on the built-in corpus, characters.

Sized to within 10% of gpt_char.py's parameter count (tests/test_experiments.py checks it), so comparisons
with the transformer are at matched capacity.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.model.name = "elmo"
    config.model.num_layers = 2
    config.model.d_model = 96           # embedding width (tied to the output)
    config.model.hidden_size = 120       # matched to gpt_char's ~0.43M parameters
    config.model.max_len = 128
    config.data.source = "builtin"
    config.data.tokenizer = "chars"
    config.data.seq_len = 128
    config.train.steps = 1000
    config.train.batch_size = 16
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    return config
