#!/usr/bin/env python
"""The one entry point: flags + an experiment config -> jaxlm.run(config, workdir, mode).

  python launch.py                                                  # the default experiment
  python launch.py --config=experiments/gpt_char.py --config.model.num_layers=6 --workdir=runs/gpt
  python launch.py --mode=sample --workdir=runs/gpt --prompt="def " --top_next=10
  python launch.py --mode=bench                                     # tokens/s, MFU, compile time -> bench.json

The process re-executes itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc malloc backed by
transparent huge pages): with the default allocator every step re-faults 100-800 MB of fresh pages, 25-45% of
a CPU step.  Opt out with --nohugepages or JAXLM_NO_REEXEC=1.

Exit codes: 0 done; 2 bad flag, config, data or workdir (one line on stderr, no traceback);
3 training diverged; 130 interrupted (after a checkpoint was written).
"""

import errno
import importlib
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_EXPERIMENT = os.path.join(HERE, "experiments", "gpt_char.py")
# OSErrors that are the machine's, not the program's (full disk, quota, read-only or unwritable files): one line.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
MODES = ("train", "eval", "sample", "bench", "analyze")

CONFIG_HELP = ( "Experiment file (experiments/*.py, optionally FILE:ARG); override any key with "
    "--config.SECTION.KEY=VALUE (type-checked; unknown keys are an error). Keys: see jaxlm/config.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<experiment>-<timestamp>); rerunning "
                               "on an existing workdir resumes from its latest complete checkpoint.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "train | eval (latest checkpoint on the validation split) | "
                          "sample (continue --prompt with a trained causal model) | bench (training speed of the "
                          "reference shapes, or of --config's model if given: WORKDIR/bench.json) | analyze (gradient "
                          "sensitivity, context ablation, attention maps of the run in --workdir: WORKDIR/analysis/).")
_RESTART = flags.DEFINE_bool("restart", False, "Train from scratch in a workdir that has checkpoints "
                             "(the old run is moved to WORKDIR/previous-<time>/, not deleted).")
_PROMPT = flags.DEFINE_string("prompt", "", "sample: the text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "sample: tokens to generate.", lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "sample: independent continuations.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sample: softmax temperature.", lower_bound=1e-3)
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample: keep the k most likely tokens (0 = all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample: nucleus sampling mass (1 = off).", lower_bound=1e-6, upper_bound=1.0)
_TOP_NEXT = flags.DEFINE_integer("top_next", 0, "sample: print the K most likely next tokens with probabilities "
                                 "instead of sampling.", lower_bound=0)
_SEED = flags.DEFINE_integer("sample_seed", 0, "sample: random seed of the sampler.")
_HUGEPAGES = flags.DEFINE_bool("hugepages", True, "Re-execute once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
                                 "(huge-page-backed malloc: 25-45% faster CPU steps); --nohugepages or "
                                 "JAXLM_NO_REEXEC=1 keep the allocator as it is.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0 "
                                   "(every process gets the same value; see scripts/launch_local.py and README).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index in "
                                   "[0, --num_processes).", lower_bound=0)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-process runs: let jax.distributed.initialize detect "
                                 "the cluster (Cloud TPU pods, SLURM, Open MPI) instead of the three flags above.")
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Use JAX's persistent compilation cache in "
                           "$JAXLM_CACHE_DIR or ~/.cache/jaxlm (second runs start faster).")


def _die(message: str, code: int = 2, *, at_once: bool = False) -> None:
    """One line on stderr, no traceback.

    ``at_once`` skips the interpreter's teardown: after a second Ctrl-C, Orbax's writer threads are cut short
    and their event loops' finalisers would print tracebacks at exit (complete checkpoints are already on disk)."""
    print(f"launch.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    parallel = sys.modules.get("jaxlm.parallel")
    if parallel is not None and parallel.is_multiprocess():   # do not wait at JAX's shutdown barrier for stuck peers
        parallel.exit_now_if_multiprocess(code)
        parallel.exit_multiprocess(code)
    if at_once:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:   # a closed pipe: nothing more to say
                pass
        os._exit(code)
    sys.exit(code)


_STOPPED_AT_ONCE = "interrupted (Ctrl-C): stopped at once; the last complete checkpoint is kept"


def _honour_a_swallowed_interrupt(unraisable) -> None:
    """sys.unraisablehook: a Ctrl-C that lands in a finaliser or a GC callback would be printed as "Exception
    ignored ..." with a traceback, and lost; stop at once instead, as the second Ctrl-C asks."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _die(_STOPPED_AT_ONCE, 130, at_once=True)
    sys.__unraisablehook__(unraisable)


def _parse_flags(argv):
    """Parse flags; the config file's overrides are applied as the flag is defined, so that is inside the try."""
    for arg in argv[1:]:
        if arg.startswith("--config=") or arg.startswith("--config:"):
            path = arg.split("=", 1)[-1].split(":")[0]
            if not os.path.isfile(path):
                _die(f"--config file not found: {path!r} (experiments: {', '.join(_experiments())})")
    try:
        config_flag = config_flags.DEFINE_config_file("config", DEFAULT_EXPERIMENT, CONFIG_HELP, lock_config=True)
        if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
            print(f"{__doc__.strip()}\n\nflags:\n{flags.FLAGS.main_module_help()}")
            sys.exit(0)
        flags.FLAGS(argv)
        return config_flag.value
    except BrokenPipeError:    # `--helpfull | head`: the reader left while help was printed; __main__ ends quietly
        raise
    except flags.Error as e:
        _die(e)
    except (AttributeError, KeyError) as e:       # ml_collections: unknown --config.a.b key
        key = str(e).strip("\"'")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        _die(f"unknown config key {' '.join(bad) or key!r}: see jaxlm/config.py (default_config) for the keys")
    except (FileNotFoundError, IsADirectoryError) as e:
        _die(f"--config file not found: {e.filename}")
    except Exception as e:                           # config file that fails to import, bad override values
        _die(f"could not load --config: {type(e).__name__}: {e}")


def _check_workdir(workdir: str) -> None:
    """--workdir must be a directory or a path one can create (not a file, nor below one)."""
    if not workdir.strip():
        _die("--workdir='' is empty; give a directory")
    path = os.path.abspath(workdir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(workdir) else f"is below the file {path}"
        _die(f"--workdir={workdir!r} {where}; give a directory")


def _experiments() -> list[str]:
    folder = os.path.join(HERE, "experiments")
    return sorted(f"experiments/{n}" for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))


def _default_workdir(argv) -> str:
    """runs/<experiment>[-<arg>]-<timestamp>."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), DEFAULT_EXPERIMENT)
    path, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _configure_jax(use_cache: bool) -> None:
    import jax

    from jaxlm import perf
    if use_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.join(perf.cache_dir(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _import_flax_without_ipython() -> None:
    """Import Flax with IPython hidden: at import, Flax asks IPython whether it runs in a notebook (for coloured
    reprs), and importing IPython for that costs 0.7-1.0 s of every launch here. A command-line process never
    runs in IPython, so the answer is the same; IPython is importable again afterwards."""
    if "IPython" in sys.modules:
        return
    sys.modules["IPython"] = None   # `import IPython` raises ImportError while this is set
    try:
        importlib.import_module("flax.nnx")
    finally:
        del sys.modules["IPython"]


HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def _reexec_with_hugepages(argv) -> None:
    """Replace this process (same pid, so exit codes and signals are unchanged) by one whose glibc malloc
    uses transparent huge pages.  Tunables are read only at process start, hence the exec."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    opt_out = {"--nohugepages", "--hugepages=false", "--hugepages=0", "--hugepages=no"}
    if ("glibc.malloc.hugetlb" in tunables or os.environ.get("JAXLM_NO_REEXEC") == "1"
            or any(a.lower() in opt_out for a in argv[1:]) or argv is not sys.argv):   # not in-process callers
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv) -> int:
    _reexec_with_hugepages(argv)
    config = _parse_flags(argv)
    mode = _MODE.value
    workdir = _WORKDIR.value
    if workdir is None:
        if mode not in ("train", "bench"):
            _die(f"--mode={mode} needs --workdir=RUN (a directory a training run wrote)")
        workdir = _default_workdir(argv) if mode == "train" else os.path.join(
            "runs", f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_workdir(workdir)

    sys.unraisablehook = _honour_a_swallowed_interrupt
    import jaxlm
    from jaxlm import config as config_lib
    from jaxlm.errors import DivergedError, Interrupted, UserError
    try:
        from jaxlm import preflight
        failed_check = None
        try:
            config_lib.validate(config)
            preflight.check(config, workdir, mode)   # a wrong path fails now, not after ~5 s of importing JAX
        except UserError as e:
            if _COORDINATOR.value is None and not _DISTRIBUTED.value:
                raise
            failed_check = e   # a multi-process run: the other processes must learn of it (agree_on_checks)
        _import_flax_without_ipython()
        from jaxlm import parallel   # before anything touches the devices
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                        auto=_DISTRIBUTED.value)
        parallel.agree_on_checks(failed_check)
        if mode == "train":   # bench children configure their own; eval/sample/analyze keep the default device
            parallel.configure_cpu_devices(config)
        _configure_jax(_CACHE.value)
        jaxlm.run(config, workdir, mode, restart=_RESTART.value, prompt=_PROMPT.value, num_tokens=_NUM_TOKENS.value,
                  num_samples=_NUM_SAMPLES.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                  top_p=_TOP_P.value, top_next=_TOP_NEXT.value, seed=_SEED.value,
                  config_given=bool(flags.FLAGS["config"].present))
    except UserError as e:
        _die(e, 2)
    except DivergedError as e:
        _die(e, 3)
    except Interrupted as e:
        _die(e, 130)
    except KeyboardInterrupt:
        _die(_STOPPED_AT_ONCE, 130, at_once=True)
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:   # anything else is a bug: keep its traceback
            raise
        _die(f"I/O error while running in workdir {workdir!r}: {e.strerror}{f' ({e.filename})' if e.filename else ''}"
             "; complete checkpoints written before it are kept", 2)
    if mode == "train" and sys.modules["jax"].process_index() == 0:   # one line per run, not per process
        print(f"done. Watch it in TensorBoard:  tensorboard --logdir {os.path.dirname(workdir) or workdir} "
              "--host 127.0.0.1   (then open http://127.0.0.1:6006)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:
        # `launch.py ... | head`: the reader closed stdout. End quietly, as a Unix tool does (a training run
        # resumes from its last checkpoint). Not SIGPIPE's default action: that would also kill the process
        # on a library's own closed pipe or socket, which Python otherwise reports as an error to handle.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit-time flush must not fail
        sys.exit(141)
