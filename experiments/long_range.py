"""The long-range study: rnn, lstm (b_f = 1 and a long-range init), elmo, gpt (learned or rotary positions), bert
at matched sizes.

  python launch.py --config=experiments/long_range.py:quick --workdir=runs/long_range_quick   # minutes
  python launch.py --config=experiments/long_range.py --workdir=runs/long_range               # the full study

A config with a ``study`` section is routed by ``--mode=train`` to ``jaxlm.analysis.study.run_study`` (the
base sections below describe one run, the GPT char LM, and are what each study run starts from).  Override
any study key: ``--config.study.seeds=5``, ``--config.study.distances=10,50,100``.

Presets (every model ~0.11M parameters, matched within 12%; ``study.size=char`` for the ~0.43M sizes):
- ``quick`` (start here; 4 min 20 s measured on an idle 2-core machine, see README): char LM: rnn, lstm,
  gpt, 1 seed, 500 steps, drop+shuffle ablation on 1,024 windows of 64 characters. Delayed recall at
  d = 10 and 50: rnn, lstm, lstm_fb3, gpt, 3 seeds, up to 500 steps.  elmo and bert: full preset only.
- ``full``: char LM: rnn, lstm, elmo, gpt, gpt_rope, bert, 3 seeds, 800 steps on 128-character windows, all
  three ablation modes on 4,096 windows at 1%; recall at d = 10, 30, 100: rnn, the three LSTMs, elmo, gpt, bert,
  3 seeds, up to 600 steps (its measured time is in README).
- ``tiny``: the test preset (2 models per task, 1 seed, recall at d = 4 only, a few steps: checks the plumbing).

Recall runs stop once solved (``study.stop_at_accuracy``), so the report also gives steps to solve.
"""

import ml_collections

from jaxlm.config import default_config


def _study(preset: str) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.size = "tiny"                     # tiny (~0.11M params) | char (~0.43M, experiments/*_char.py; not timed)
    s.models = "rnn,lstm,lstm_fb3,lstm_chrono,elmo,gpt,bert"   # recall task
    s.lm_models = "rnn,lstm,elmo,gpt,gpt_rope,bert"   # char LM task (gpt_nope: a GPT without positions)
    s.seeds = 3                         # recall seeds (0 = skip the task)
    s.lm_seeds = 3                      # char LM seeds (0 = skip the task)
    s.distances = "10,30,100"           # recall dependency distances d
    s.num_symbols = 8                   # recall alphabet (chance = 1/8)
    s.filler = "random"                 # random-symbol distractors separate the models more than a blank
    s.recall_steps = 600                # the budget; a run stops earlier once solved (stop_at_accuracy)
    s.stop_at_accuracy = 0.99           # train/accuracy over a log window (25 steps) that ends a recall run
    s.recall_batch_size = 32
    s.probe_batches = 8                 # held-out recall batches of 64 for the accuracy
    s.lm_steps = 800
    s.lm_batch_size = 16
    s.lm_seq_len = 128
    s.lm_corpus_bytes = 4_000_000
    s.learning_rate = 3e-3
    s.warmup_steps = 50
    s.eval_batches = 8
    s.num_sequences = 256               # sensitivity: validation windows
    s.num_windows = 4096                # ablation windows (16k resolves 0.3% losses; 4k about 0.6%)
    s.tolerance = 0.01                  # effective context: within 1% of the best loss over d
    s.ablation_modes = "drop,shuffle,random"
    s.attention = True                  # attention maps + head view for seed 0 of gpt/bert
    if preset == "quick":
        s.models = "rnn,lstm,lstm_fb3,gpt"
        s.lm_models = "rnn,lstm,gpt"
        s.lm_seeds = 1
        s.distances = "10,50"
        s.recall_steps = 500
        s.lm_steps = 500
        s.lm_seq_len = 64
        s.lm_corpus_bytes = 1_000_000
        s.eval_batches = 4
        s.num_sequences = 128
        s.num_windows = 1024
        s.tolerance = 0.05              # 1,024 windows cannot resolve 1% (stderr ~1-2%)
        s.ablation_modes = "drop,shuffle"
    elif preset == "tiny":
        s.models = "rnn,gpt"
        s.lm_models = "lstm,gpt"
        s.seeds = s.lm_seeds = 1
        s.distances = "4"
        s.recall_steps = 10
        s.recall_batch_size = 8
        s.probe_batches = 1
        s.lm_steps = 5
        s.lm_batch_size = 4
        s.lm_seq_len = 16
        s.lm_corpus_bytes = 200_000
        s.ablation_modes = "drop,shuffle"
        s.eval_batches = 1
        s.num_sequences = 8
        s.num_windows = 64
        s.tolerance = 0.05
    elif preset != "full":
        raise ValueError(f"unknown long_range preset {preset!r}; choose from full, quick, tiny")
    return s


def get_config(preset: str = "full"):
    config = default_config()
    config.model.name = "gpt"            # the base run (each study run changes model and data)
    config.model.max_len = 128
    config.data.tokenizer = "chars"
    config.study = _study(preset)
    return config
