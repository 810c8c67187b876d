"""nanoGPT's CPU "baby" run on tiny Shakespeare, characters (the anchor: val loss about 1.88 nats/char).

4 layers, 4 heads, d_model 128, seq_len 64, batch 12, 2000 steps, dropout 0, lr 1e-3 warming up 100 steps
and decaying to 1e-4, beta2 0.99, weight decay 0.1, clip 1.0; the first 90% of the file trains, the last
10% validates. Pass another copy of the file with --config.data.source=text:PATH.
"""

import os

from jaxlm.config import default_config

SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                           "tinyshakespeare.txt")


def get_config():
    config = default_config()
    config.model.name = "gpt"
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.d_model = 128
    config.model.max_len = 64
    config.model.dropout = 0.0
    config.data.source = "text:" + os.path.normpath(SHAKESPEARE)
    config.data.tokenizer = "chars"
    config.data.seq_len = 64
    config.data.valid_fraction = 0.1      # contiguous, at the end (nanoGPT's split)
    config.train.steps = 2000
    config.train.batch_size = 12
    config.train.eval_every = 500
    config.train.eval_batches = 200       # nanoGPT: eval_iters=200 batches of 12
    config.train.checkpoint_every = 500
    config.train.log_every = 25
    config.optim.learning_rate = 1e-3
    config.optim.min_learning_rate = 1e-4
    config.optim.warmup_steps = 100
    config.optim.beta2 = 0.99
    config.optim.weight_decay = 0.1
    config.optim.grad_clip = 1.0
    return config
