"""The one config object: defaults for every section, validation with one-line errors, config.json I/O.

Experiments (``experiments/*.py``) start from :func:`default_config` and change what they need; launch.py
applies ``--config.a.b=value`` overrides on top and calls :func:`validate` before anything runs.
"""

from __future__ import annotations

import json
import os

import ml_collections

from jaxlm.errors import UserError

MODEL_NAMES = ("rnn", "lstm", "elmo", "bert", "gpt")
TOKENIZERS = ("bytes", "chars", "bpe")
OBJECTIVES = ("causal_lm", "masked_lm", "bidirectional_lm")
DEFAULT_OBJECTIVE = {"rnn": "causal_lm", "lstm": "causal_lm", "gpt": "causal_lm",
                     "bert": "masked_lm", "elmo": "bidirectional_lm"}
RECURRENT_MODELS = ("rnn", "lstm", "elmo")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("jit", "pmap")
SCHEDULES = ("cosine", "linear", "constant")
LSTM_INITS = ("default", "chrono")
POSITION_ENCODINGS = ("learned", "rope", "none")   # jaxlm/models/positions.py
SOURCE_KINDS = ("builtin", "text", "jsonl", "synthetic")

# Keys whose change on resume makes the saved checkpoint meaningless (DESIGN.md: "a config that conflicts
# with the saved one is an error that names the differing keys").  Everything else may change on resume.
RESUME_SENSITIVE_PREFIXES = ("model.", "data.tokenizer", "data.vocab_size", "data.source", "objective.name",
                             "data.seq_len", "seed", "train.batch_size", "train.stateful")
# Keys whose change between zero and non-zero changes the optimizer state's structure (optim.make_optimizer
# adds the clipping transform only when grad_clip > 0), so no saved step could be restored.
RESUME_SENSITIVE_WHEN_TOGGLED = ("optim.grad_clip",)


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default: a small GPT on the built-in corpus that trains in minutes on 2 CPU cores."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "gpt"
    c.model.num_layers = 2
    c.model.d_model = 128            # embedding width (and transformer width)
    c.model.hidden_size = 256        # recurrent state size (rnn, lstm, elmo)
    c.model.projection_size = 0      # LSTMP projection of the recurrent output; 0 = none
    c.model.num_heads = 4
    c.model.mlp_ratio = 4            # transformer MLP width = mlp_ratio * d_model
    c.model.dropout = 0.0
    c.model.max_len = 256            # longest sequence the model accepts (its context window)
    c.model.position_encoding = "learned"  # transformers: learned (GPT-2/BERT) | rope (Su et al. 2021) | none (NoPE)
    c.model.dtype = "float32"        # compute dtype; parameters and optimizer state stay float32
    c.model.gelu_approximate = False  # tanh-approximate GELU: faster on CPU, a (slightly) different function
    c.model.attention_query_blocks = 4  # causal attention in <= this many query blocks of >= 64 (1 = one T x T)
    c.model.forget_bias = 1.0        # LSTM forget-gate bias at init (Gers et al. 2000; Jozefowicz et al. 2015)
    c.model.lstm_init = "default"    # default | chrono (Tallec & Ollivier 2018: forget bias ~ log U(1, max_len))
    c.model.embed_init_std = 0.0     # token-embedding init std; 0 = the model's default (0.02 gpt/bert, 1/sqrt(d_model) recurrent)
    c.model.remat = False            # rematerialise blocks in the backward pass (less memory, more compute)

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"        # builtin | text:PATH_OR_GLOB | jsonl:PATH:FIELD | synthetic:TASK
    c.data.tokenizer = "bytes"       # bytes | chars | bpe
    c.data.vocab_size = 0            # bpe only: target vocabulary size (e.g. 4096)
    c.data.seq_len = 128
    c.data.valid_fraction = 0.1      # the last fraction of the corpus, contiguous (nanoGPT's split)
    c.data.max_corpus_bytes = 4_000_000  # builtin: cap on bytes read from the standard library (0 = all)
    c.data.distance = 16             # synthetic tasks: the dependency distance d (tokens between cue and answer)
    c.data.num_symbols = 8           # synthetic tasks: size of the symbol alphabet
    c.data.filler = "random"         # synthetic recall: distractors are random symbols ("random") or one blank ("blank")

    c.objective = ml_collections.ConfigDict()
    c.objective.name = ""            # "" = the model's natural objective (see DEFAULT_OBJECTIVE)
    c.objective.mask_prob = 0.15     # masked_lm: fraction of tokens selected (Devlin et al. 2019)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 16          # global batch, split over devices and processes
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.log_every = 20           # metrics are fetched from the device only this often (<= 32, see DESIGN)
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.stateful = False         # recurrent models: carry (h, c) across steps over contiguous streams
    c.train.sample_length = 200      # characters/tokens of the text sample logged at each eval
    c.train.grad_accum_steps = 1
    c.train.skip_nonfinite = False
    c.train.stop_at_accuracy = 0.0   # > 0: stop once a logged train/accuracy reaches it (e.g. 0.99 = task solved)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.min_learning_rate = 1e-4  # cosine decays to this
    c.optim.schedule = "cosine"      # cosine | linear | constant (after linear warmup)
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1       # decoupled (AdamW); never applied to biases, norms or embeddings' positions
    c.optim.grad_clip = 1.0          # global-norm clipping; 0 = off
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.99

    c.analysis = ml_collections.ConfigDict()
    c.analysis.tolerance = 0.01      # effective context: smallest d whose loss is within this of the best
    c.analysis.num_sequences = 256   # sequences averaged for gradient sensitivity
    c.analysis.num_windows = 4096    # target windows for context ablation
    c.analysis.attention_text = ""   # text for attention maps ("" = the start of the validation split)
    c.analysis.seq_len = 0           # analysed window length (0 = data.seq_len; longer: beyond the training length)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.strategy = "jit"      # jit (mesh + NamedSharding) | pmap (legacy)
    c.parallel.fsdp = 1              # jit: split params + optimizer state over this many devices (must divide them)
    c.parallel.cpu_devices = 0       # CPU: XLA devices to split the host into (0 = auto, see parallel.cpu_device_count)
    return c


def char_comparison_config() -> ml_collections.ConfigDict:
    """The shared set-up of the parameter-matched *_char experiments: same data, tokens, budget and optimizer,
    so that rnn/lstm/elmo/bert/gpt runs differ only in the model (fair comparisons)."""
    c = default_config()
    c.model.num_layers = 2
    c.model.max_len = 128
    c.data.source = "builtin"
    c.data.tokenizer = "chars"        # one token per character of the stdlib sources
    c.data.seq_len = 128
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    return c


def objective_name(config) -> str:
    """The objective actually trained: objective.name, or the model's natural one."""
    return config.objective.name or DEFAULT_OBJECTIVE[config.model.name]


def caveats(config) -> list[str]:
    """Settings that are valid but probably not what was meant: each a line the training log starts with."""
    notes = []
    if config.model.name == "bert" and objective_name(config) == "causal_lm":   # kept: a leakage demonstration
        notes.append("model.name=bert attends in both directions, so with objective.name=causal_lm each position "
                     "sees the token it predicts and the loss falls towards 0 by copying it; a causal LM is "
                     "model.name=gpt")
    encoding = config.model.position_encoding
    if encoding != "learned" and config.model.name in RECURRENT_MODELS:
        notes.append(f"model.position_encoding={encoding} has no effect on model.name={config.model.name}: recurrent "
                     "models read order from their recurrence, not from position encodings (gpt and bert use it)")
    if encoding == "none" and config.model.name == "bert":
        notes.append("model.position_encoding=none on a bidirectional bert: nothing tells it where a token is, so it "
                     "sees each window as a bag of words")
    return notes


def _fail(key: str, value, allowed: str):
    raise UserError(f"invalid {key}={value!r}: {allowed}")


def _positive(config, keys):
    for key in keys:
        value = _get(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            _fail(key, value, "must be a positive number")


def splits_batch(train, devices: int) -> bool:
    """True if `devices` devices each get an equal share of the batch, in whole gradient-accumulation micro-batches."""
    return train.batch_size % devices == 0 and (train.batch_size // devices) % max(train.grad_accum_steps, 1) == 0


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config) -> None:
    """Raise UserError naming the first bad value and what is allowed; return None if the config is usable."""
    m, d, t, o = config.model, config.data, config.train, config.optim
    if m.name not in MODEL_NAMES:
        _fail("model.name", m.name, f"choose from {', '.join(MODEL_NAMES)}")
    if d.tokenizer not in TOKENIZERS:
        _fail("data.tokenizer", d.tokenizer, f"choose from {', '.join(TOKENIZERS)}")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"choose from {', '.join(DTYPES)}")
    if config.parallel.strategy not in STRATEGIES:
        _fail("parallel.strategy", config.parallel.strategy, f"choose from {', '.join(STRATEGIES)}")
    fsdp = config.parallel.fsdp
    if not isinstance(fsdp, int) or isinstance(fsdp, bool) or fsdp < 1:
        _fail("parallel.fsdp", fsdp, "must be a positive integer dividing the number of devices")
    if fsdp > 1 and config.parallel.strategy != "jit":
        _fail("parallel.fsdp", fsdp, "fsdp > 1 needs parallel.strategy='jit'")
    cpu_devices = config.parallel.cpu_devices
    if not isinstance(cpu_devices, int) or isinstance(cpu_devices, bool) or cpu_devices < 0:
        _fail("parallel.cpu_devices", cpu_devices, "must be 0 (auto) or a positive number of CPU devices")
    blocks = m.attention_query_blocks
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        _fail("model.attention_query_blocks", blocks, "must be a positive integer (1 = one T x T score matrix)")
    if o.schedule not in SCHEDULES:
        _fail("optim.schedule", o.schedule, f"choose from {', '.join(SCHEDULES)}")
    if m.position_encoding not in POSITION_ENCODINGS:
        _fail("model.position_encoding", m.position_encoding, f"choose from {', '.join(POSITION_ENCODINGS)}")
    if m.position_encoding == "rope" and m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2:
        _fail("model.position_encoding", m.position_encoding, f"rope needs an even head dimension; "
              f"model.d_model={m.d_model} / model.num_heads={m.num_heads} = {m.d_model // m.num_heads}")
    if m.lstm_init not in LSTM_INITS:
        _fail("model.lstm_init", m.lstm_init, f"choose from {', '.join(LSTM_INITS)}")
    if config.objective.name and config.objective.name not in OBJECTIVES:
        _fail("objective.name", config.objective.name, f"choose from {', '.join(OBJECTIVES)} or '' for the model's own")
    if (objective_name(config) == "bidirectional_lm") != (m.name == "elmo"):   # only ELMo has two directions
        _fail("objective.name", config.objective.name, f"model.name={m.name} trains with "
              + ("bidirectional_lm only (or '')" if m.name == "elmo" else "causal_lm or masked_lm (or ''); "
                 "bidirectional_lm needs model.name=elmo"))
    kind = d.source.split(":", 1)[0]
    if kind not in SOURCE_KINDS or (kind != "builtin" and ":" not in d.source) or (kind == "builtin" and d.source != "builtin"):
        _fail("data.source", d.source, "use builtin, text:PATH_OR_GLOB, jsonl:PATH:FIELD or synthetic:TASK")
    _positive(config, ["model.num_layers", "model.d_model", "model.hidden_size", "model.num_heads", "model.mlp_ratio",
                       "model.max_len", "data.seq_len", "train.steps", "train.batch_size", "train.eval_every",
                       "train.eval_batches", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                       "train.grad_accum_steps", "optim.learning_rate"])
    for key in ("model.dropout", "data.valid_fraction", "objective.mask_prob"):
        value = _get(config, key)
        if not 0.0 <= value < 1.0:
            _fail(key, value, "must be in [0, 1)")
    if not 0.0 < d.valid_fraction:
        _fail("data.valid_fraction", d.valid_fraction, "must be in (0, 1): evaluation needs a validation split")
    for key in ("model.projection_size", "model.embed_init_std", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
                "optim.min_learning_rate", "data.vocab_size", "data.max_corpus_bytes", "train.sample_length",
                "analysis.seq_len"):
        if _get(config, key) < 0:
            _fail(key, _get(config, key), "must be >= 0")
    if m.d_model % m.num_heads:
        _fail("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")
    if d.seq_len > m.max_len:
        _fail("data.seq_len", d.seq_len, f"must be <= model.max_len={m.max_len}")
    if t.log_every > 32:
        _fail("train.log_every", t.log_every, "must be <= 32 (more queued steps hang XLA:CPU collectives; DESIGN.md)")
    if t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", t.grad_accum_steps, f"must divide train.batch_size={t.batch_size}")
    if config.parallel.cpu_devices and not splits_batch(t, config.parallel.cpu_devices):
        _fail("parallel.cpu_devices", config.parallel.cpu_devices, f"must split train.batch_size={t.batch_size} into "
              f"equal per-device batches divisible by train.grad_accum_steps={t.grad_accum_steps}, or be 0 (auto)")
    if d.tokenizer == "bpe" and d.vocab_size < 300:
        _fail("data.vocab_size", d.vocab_size, "bpe needs data.vocab_size >= 300 (256 bytes + special tokens + merges)")
    if t.stateful and m.name not in RECURRENT_MODELS:
        _fail("train.stateful", t.stateful, f"only recurrent models ({', '.join(RECURRENT_MODELS)}) carry state")
    if t.stateful and m.name == "elmo":
        _fail("train.stateful", t.stateful, "elmo's backward direction cannot carry state across segments")
    if not 0.0 <= t.stop_at_accuracy <= 1.0:
        _fail("train.stop_at_accuracy", t.stop_at_accuracy, "must be in [0, 1] (0 = train all train.steps)")
    for beta in ("optim.beta1", "optim.beta2"):
        if not 0.0 <= _get(config, beta) < 1.0:
            _fail(beta, _get(config, beta), "must be in [0, 1)")


def flatten(config) -> dict:
    """{'model.num_layers': 2, ...}: the flat view used for hparams and resume comparison."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config.to_dict() if hasattr(config, "to_dict") else config, "")
    return out


def save(config, workdir: str) -> None:
    """Write the resolved config to WORKDIR/config.json (what was run, exactly)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def load(workdir: str) -> ml_collections.ConfigDict:
    """Read WORKDIR/config.json back into a ConfigDict, filling keys added since with their defaults."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no config.json in workdir {workdir!r}: train a run there first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed {path!r}: {e}") from None
    return from_dict(saved)


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (as config.json holds it) on top of today's defaults: keys added since take their default
    (which by contract reproduces the old behaviour), keys since removed are dropped."""
    config = default_config()
    for key, value in flatten(saved).items():
        section = config
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                section = section[p]
            if leaf in section:
                section[leaf] = value
        except (KeyError, TypeError):
            continue
    return config


def resume_conflicts(saved, current) -> list[str]:
    """Keys that differ between a workdir's saved config and the current one and would corrupt a resume."""
    a, b = flatten(saved), flatten(current)
    changed = {k for k in set(a) | set(b) if k.startswith(RESUME_SENSITIVE_PREFIXES) and a.get(k) != b.get(k)}
    changed |= {k for k in RESUME_SENSITIVE_WHEN_TOGGLED if (a.get(k, 0) > 0) != (b.get(k, 0) > 0)}
    return sorted(changed)
