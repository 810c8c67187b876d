"""jaxlm: train RNNs, LSTMs, ELMo, BERT and GPT in JAX, and measure how they use long-range context."""

__version__ = "0.1.0"

MODES = ("train", "eval", "sample")


def run(config, workdir: str, mode: str = "train", **options):
    """Run `mode` on `workdir` with a validated config (launch.py is the command-line face of this)."""
    from jaxlm import modes   # lazy: `import jaxlm` stays cheap

    return modes.MODE_FUNCTIONS[mode](config, workdir, **options)
