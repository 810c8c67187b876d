"""Every bad input ends the same way (issue 7): exit code 2, exactly one non-empty line on stderr that names the
bad value, and no traceback. Each case is a real `python launch.py ...` in a subprocess (without the huge-page
re-exec, which keeps the pid, exit code and output: tests/test_bench.py checks it).

Arguments are templates: {data} is a folder of (bad) data files, {w} a fresh workdir, {char_run} / {bert_run}
finished 2-step runs (a char-vocabulary GPT, a BERT, an ELMo), {no_ckpt} the char run without its
checkpoints, {no_tok} / {bad_tok} / {wrong_tok} copies of the char
run whose tokenizer.json is missing / not JSON / JSON that is not a vocabulary.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import pytest

from child_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.max_len=32", "--config.data.seq_len=32", "--config.train.batch_size=4",
        "--config.train.log_every=2", "--config.train.eval_every=2", "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=2", "--config.train.sample_length=4", "--config.train.steps=2"]
CORPUS = "the cat sat on a mat and the dog ran far away home\n" * 60


def launch(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=child_env(JAXLM_NO_REEXEC="1"), timeout=timeout)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "corpus.txt").write_text(CORPUS)
    (data / "empty.txt").write_text("")
    (data / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (data / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    (data / "short.txt").write_text("too short\n")
    (data / "notjson.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (data / "nofield.jsonl").write_text('{"body": "the text is under another key"}\n')
    (data / "notobject.jsonl").write_text('["a", "list"]\n')
    (data / "notstring.jsonl").write_text('{"text": 42}\n')
    (data / "subdir").mkdir()
    runs = tmp_path_factory.mktemp("runs")
    char_run, bert_run, elmo_run = str(runs / "char"), str(runs / "bert"), str(runs / "elmo")
    for workdir, extra in ((char_run, ["--config.data.tokenizer=chars"]),
                           (bert_run, ["--config.model.name=bert", "--config.data.tokenizer=bytes"]),
                           (elmo_run, ["--config.model.name=elmo", "--config.model.hidden_size=32",
                                       "--config.data.tokenizer=bytes"])):
        r = launch(f"--workdir={workdir}", f"--config.data.source=text:{data / 'corpus.txt'}", *TINY, *extra)
        assert r.returncode == 0, r.stderr
    out = {"data": str(data), "char_run": char_run, "bert_run": bert_run, "elmo_run": elmo_run}
    for name, content in (("no_tok", None), ("bad_tok", "{not json"), ("wrong_tok", json.dumps({"type": "chars",
                                                                                                 "chars": ["b", "a"]}))):
        out[name] = str(runs / name)
        shutil.copytree(char_run, out[name])
        if content is None:
            os.remove(os.path.join(out[name], "tokenizer.json"))
        else:
            with open(os.path.join(out[name], "tokenizer.json"), "w") as f:
                f.write(content)
    out["no_ckpt"] = str(runs / "no_ckpt")   # a run killed before its first checkpoint
    shutil.copytree(char_run, out["no_ckpt"])
    shutil.rmtree(os.path.join(out["no_ckpt"], "checkpoints"))
    empty = runs / "empty"
    empty.mkdir()
    out["empty"] = str(empty)
    bad_config = runs / "bad_config"
    shutil.copytree(char_run, bad_config)
    (bad_config / "config.json").write_text("{\"model\": ")
    out["bad_config"] = str(bad_config)
    return out


TEXT = "--config.data.source=text:{data}"
CASES = [
    # data: files
    ("missing_corpus", [TEXT + "/missing.txt"], "missing.txt"),
    ("empty_corpus", [TEXT + "/empty.txt"], "empty.txt"),
    ("binary_corpus", [TEXT + "/binary.bin"], "binary.bin"),
    ("non_utf8_corpus", [TEXT + "/latin1.txt"], "latin1.txt"),
    ("glob_matches_nothing", [TEXT + "/*.nomatch"], "*.nomatch"),
    ("directory_as_corpus", [TEXT + "/subdir"], "subdir"),
    ("corpus_shorter_than_a_window", [TEXT + "/short.txt"], "seq_len=32"),
    ("unknown_source_kind", ["--config.data.source=http://example.com/x.txt"], "http://example.com/x.txt"),
    ("unknown_synthetic_task", ["--config.data.source=synthetic:nosuchtask"], "nosuchtask"),
    ("jsonl_without_field", ["--config.data.source=jsonl:{data}/notjson.jsonl"], "jsonl:PATH:FIELD"),
    ("jsonl_bad_line", ["--config.data.source=jsonl:{data}/notjson.jsonl:text"], "line 2"),
    ("jsonl_missing_field", ["--config.data.source=jsonl:{data}/nofield.jsonl:text"], "'text'"),
    ("jsonl_not_an_object", ["--config.data.source=jsonl:{data}/notobject.jsonl:text"], "notobject.jsonl"),
    ("jsonl_field_not_string", ["--config.data.source=jsonl:{data}/notstring.jsonl:text"], "notstring.jsonl"),
    # config values
    ("unknown_tokenizer", ["--config.data.tokenizer=wordpiece"], "wordpiece"),
    ("bpe_vocab_too_small", ["--config.data.tokenizer=bpe", "--config.data.vocab_size=100"], "vocab_size=100"),
    ("seq_len_above_max_len", ["--config.data.seq_len=64"], "seq_len=64"),
    ("heads_do_not_divide_width", ["--config.model.num_heads=3"], "num_heads=3"),
    ("unknown_position_encoding", ["--config.model.position_encoding=alibi"], "alibi"),
    ("rope_with_an_odd_head_dimension", ["--config.model.position_encoding=rope", "--config.model.d_model=12",
                                         "--config.model.num_heads=4"], "= 3"),
    ("negative_analysis_length", ["--config.analysis.seq_len=-1"], "analysis.seq_len=-1"),
    ("zero_query_blocks", ["--config.model.attention_query_blocks=0"], "attention_query_blocks=0"),
    ("zero_layers", ["--config.model.num_layers=0"], "num_layers=0"),
    ("negative_width", ["--config.model.d_model=-8"], "d_model=-8"),
    ("zero_batch", ["--config.train.batch_size=0"], "batch_size=0"),
    ("negative_steps", ["--config.train.steps=-5"], "steps=-5"),
    ("zero_max_len", ["--config.model.max_len=0", "--config.data.seq_len=1"], "max_len=0"),
    ("negative_learning_rate", ["--config.optim.learning_rate=-0.1"], "learning_rate=-0.1"),
    ("dropout_above_one", ["--config.model.dropout=1.5"], "dropout=1.5"),
    ("unknown_dtype", ["--config.model.dtype=float8"], "float8"),
    ("unknown_model", ["--config.model.name=transformerxl"], "transformerxl"),
    ("unknown_objective", ["--config.objective.name=contrastive"], "contrastive"),
    ("bidirectional_objective_without_elmo", ["--config.objective.name=bidirectional_lm"], "bidirectional_lm"),
    ("elmo_with_masked_lm", ["--config.model.name=elmo", "--config.objective.name=masked_lm"], "masked_lm"),
    ("unknown_strategy", ["--config.parallel.strategy=ddp"], "ddp"),
    ("negative_cpu_devices", ["--config.parallel.cpu_devices=-1"], "cpu_devices=-1"),
    ("cpu_devices_not_splitting_batch", ["--config.parallel.cpu_devices=3", "--config.train.batch_size=8"],
     "cpu_devices=3"),
    ("stateful_transformer", ["--config.train.stateful=True"], "stateful"),
    ("log_every_too_large", ["--config.train.log_every=64"], "log_every=64"),
    ("grad_accum_not_dividing_batch", ["--config.train.grad_accum_steps=3"], "grad_accum_steps=3"),
    ("stop_at_accuracy_above_one", ["--config.train.stop_at_accuracy=1.5"], "stop_at_accuracy=1.5"),
    ("negative_embed_init_std", ["--config.model.embed_init_std=-0.1"], "embed_init_std=-0.1"),
    ("unknown_config_key", ["--config.model.nonexistent=3"], "nonexistent"),
    ("unknown_config_section", ["--config.modle.d_model=3"], "modle"),
    ("wrong_type_int", ["--config.train.steps=abc"], "abc"),
    ("wrong_type_float_for_int", ["--config.model.num_layers=2.5"], "2.5"),
    ("wrong_type_bool", ["--config.train.stateful=maybe"], "maybe"),
    ("missing_experiment_file", ["--config=experiments/does_not_exist.py"], "does_not_exist"),
    # flags
    ("unknown_mode", ["--mode=fly"], "fly"),
    ("unknown_flag", ["--learning_rate=3"], "learning_rate"),
    ("negative_top_k", ["--mode=sample", "--workdir={char_run}", "--top_k=-1"], "top_k"),
    ("workdir_is_a_file", ["--workdir={data}/corpus.txt"], "corpus.txt"),
    ("workdir_below_a_file", ["--workdir={data}/corpus.txt/run"], "corpus.txt/run"),
    # workdirs: sampling, evaluation, resuming
    ("sample_without_workdir", ["--mode=sample"], "--workdir"),
    ("sample_empty_workdir", ["--mode=sample", "--workdir="], "--workdir"),
    ("sample_missing_workdir", ["--mode=sample", "--workdir={data}/nope"], "nope"),
    ("sample_without_checkpoint", ["--mode=sample", "--workdir={empty}"], "{empty}"),
    ("eval_without_checkpoint", ["--mode=eval", "--workdir={empty}"], "{empty}"),
    ("sample_config_but_no_checkpoint", ["--mode=sample", "--workdir={no_ckpt}"], "{no_ckpt}"),
    ("eval_config_but_no_checkpoint", ["--mode=eval", "--workdir={no_ckpt}"], "{no_ckpt}"),
    ("sample_on_an_elmo_run", ["--mode=sample", "--workdir={elmo_run}", "--prompt=the"], "'elmo'"),
    ("bert_prompt_without_mask", ["--mode=sample", "--workdir={bert_run}", "--prompt=the cat"], "'the cat'"),
    ("prompt_outside_char_vocab", ["--mode=sample", "--workdir={char_run}", "--prompt=the Zebra"], "'Z'"),
    ("tokenizer_json_missing", ["--mode=sample", "--workdir={no_tok}", "--prompt=the"], "tokenizer.json"),
    ("tokenizer_json_not_json", ["--mode=sample", "--workdir={bad_tok}", "--prompt=the"], "tokenizer.json"),
    ("tokenizer_json_not_a_vocab", ["--mode=sample", "--workdir={wrong_tok}", "--prompt=the"], "tokenizer.json"),
    ("config_json_malformed", ["--mode=sample", "--workdir={bad_config}"], "config.json"),
]


def _command(args, paths, workdir):
    args = [a.format(**paths, w=workdir) for a in args]
    if not any(a.startswith("--mode=") and a != "--mode=train" for a in args):
        if not any(a.startswith("--workdir") for a in args):
            args.insert(0, f"--workdir={workdir}")
        args = [f"--config.data.source=text:{paths['data']}/corpus.txt", *TINY, *args]   # a run that would work
    return args


@pytest.fixture(scope="module")
def results(paths, tmp_path_factory):
    """All cases, three subprocesses at a time (most of each is Python and JAX start-up)."""
    root = tmp_path_factory.mktemp("workdirs")
    commands = {name: _command(args, paths, str(root / name)) for name, args, _ in CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(launch, *command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name, needle", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_value(name, needle, paths, results):
    needle = needle.format(**paths)
    r = results[name]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("launch.py: error: "), lines[0]
    assert needle in lines[0], (needle, lines[0])


def test_the_table_is_big_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_the_checks_made_before_importing_jax_import_none_of_it(paths):
    """launch.py runs jaxlm.preflight before JAX, Flax and Orbax (4-5 s of start-up), so the path and workdir
    cases above fail in under a second: a valid source and a trained run pass it with none of them imported."""
    code = ("import sys; from jaxlm import config, preflight; c = config.default_config(); "
            f"c.data.source = 'text:{paths['data']}/corpus.txt'; preflight.check(c, '', 'train'); "
            f"preflight.check(c, {paths['char_run']!r}, 'sample'); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("args", [["--config.data.source=text:{data}/missing.txt", "--workdir={w}"],
                                  ["--mode=sample", "--workdir={no_ckpt}"]], ids=["missing_corpus", "no_checkpoint"])
def test_launch_rejects_a_wrong_path_before_importing_jax(args, paths, tmp_path):
    """The user-facing side of the above: launch.py exits 2 on these without JAX ever being imported."""
    argv = [a.format(**paths, w=str(tmp_path / "run")) for a in args]
    code = ("import runpy, sys\nsys.argv = ['launch.py', *%r]\ntry:\n    runpy.run_path('launch.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'jax' in sys.modules)\n" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=child_env(JAXLM_NO_REEXEC="1"))
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr[-2000:])
    assert out.stderr.strip().startswith("launch.py: error: ") and "\n" not in out.stderr.strip(), out.stderr
