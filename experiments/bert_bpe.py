"""BERT-style masked-LM on word pieces: byte-level BPE (HF tokenizers) trained on the corpus's training split.

Pass your own text with --config.data.source=text:PATH_OR_GLOB; fill in blanks afterwards with
python launch.py --mode=sample --workdir=W --prompt="def [MASK](self):".
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.model.name = "bert"
    config.model.num_layers = 4
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.max_len = 128
    config.data.source = "builtin"
    config.data.tokenizer = "bpe"
    config.data.vocab_size = 4096        # word pieces: a BPE vocabulary learned from the training split
    config.data.seq_len = 128
    config.objective.mask_prob = 0.15
    config.train.steps = 2000
    config.train.batch_size = 16
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    return config
