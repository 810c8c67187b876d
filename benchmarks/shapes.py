"""The reference benchmark shapes as an experiment file: ``--config=benchmarks/shapes.py:gpt_small``.

  python launch.py --mode=bench --config=benchmarks/shapes.py:lstm_small   # one shape
  python launch.py --config=benchmarks/shapes.py:gpt_small                 # or train it (on the builtin corpus)

Shapes (jaxlm/bench.py SHAPES): gpt_tiny, gpt_small, gpt_small_v8192, lstm_tiny, lstm_small.
"""

from jaxlm import bench


def get_config(shape: str = "gpt_small"):
    return bench.shape_config(shape)
