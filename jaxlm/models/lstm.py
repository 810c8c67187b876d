"""PLACEHOLDER (being written): RNN and LSTM language models."""


class RNNLM:
    def __init__(self, *a, **k):
        raise NotImplementedError


class LSTMLM(RNNLM):
    pass


def flops_per_token(cfg, vocab_size, seq_len):
    raise NotImplementedError
