"""A disk cache of the traced train and eval steps (`jax.export`), so a relaunch skips tracing the model in Python.

JAX's persistent compilation cache (launch.py) already spares a relaunch XLA's compile, but not tracing the
model and optimizer in Python and lowering them to StableHLO: on GPT small that was 0.4-0.7 s of a ~1 s warm
start.  This cache keeps the step as a serialized `jax.export.Exported` in ``<compilation cache>/jaxlm-steps/``,
under a key made of everything the traced program depends on: jaxlm's source files and those of any other
imported module that is not an installed package (an experiment file, a user's model), the versions of jax,
jaxlib, flax and optax, the jax flags that change tracing, the caller's key (the config, but for the keys that
cannot change the program, such as the seed: UNTRACED_KEYS; and the vocabulary), and
the tree structure, shapes, dtypes and shardings of the arguments.  A miss traces once (as without the cache)
and writes the entry; an unreadable entry is ignored and rewritten.  The `MAX_ENTRIES` most recently used
entries are kept: an edit of the source or a new config makes a new entry, and old ones go.  Used only while
JAX's persistent cache is on, for ``parallel.strategy=jit`` in a single process (`parallel.DataParallel`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import sysconfig
import tempfile
from typing import Callable

import jax

try:   # private: only for skipping an unneeded LAPACK load (_lapack_only_if_called); optional
    from jax._src.export import _export as _jax_export_internals
except ImportError:   # pragma: no cover (a jax that moved it)
    _jax_export_internals = None

SUBDIR = "jaxlm-steps"
MAX_ENTRIES = 64   # ~0.1-1 MB each
# jax flags that change what tracing produces (the compile options are the persistent cache's own business)
_TRACE_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_rank_promotion", "jax_use_shardy_partitioner")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
_source_digest: str | None = None


def cache_dir() -> str | None:
    """Where entries live: beside JAX's persistent compilation cache, while that is on and on a local disk
    (JAX also takes URLs such as gs://..., which plain file I/O here must not turn into a local directory)."""
    return steps_dir(jax.config.jax_compilation_cache_dir)


def steps_dir(compilation_cache_dir: str | None) -> str | None:
    root = compilation_cache_dir
    return os.path.join(root, SUBDIR) if root and "://" not in root else None


def source_digest() -> str:
    """sha256 of every .py file of the jaxlm package (once per process), and of the other imported modules
    that live outside the Python installation (experiment files and user code: they may change the step)."""
    global _source_digest
    root = os.path.dirname(os.path.abspath(__file__))
    if _source_digest is None:
        h = hashlib.sha256()
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                _hash_file(h, os.path.join(folder, name), root)
        _source_digest = h.hexdigest()
    h = hashlib.sha256(_source_digest.encode())
    paths = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} - {None}
    installed = tuple({p + os.sep for p in paths} | {os.path.realpath(p) + os.sep for p in paths})
    for path in sorted(_user_module_files(root + os.sep, installed)):
        _hash_file(h, path, "/")
    return h.hexdigest()


def _user_module_files(jaxlm_root: str, installed: tuple[str, ...]) -> set[str]:
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py") or path.startswith(installed):
            continue
        path = os.path.realpath(path)
        if not path.startswith(jaxlm_root) and not path.startswith(installed) and os.path.isfile(path):
            files.add(path)
    return files


def _hash_file(h, path: str, root: str) -> None:
    h.update(os.path.relpath(path, root).encode())
    with open(path, "rb") as f:
        h.update(f.read())


def _versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _describe(leaves) -> list:
    """Shape, dtype and sharding of each argument leaf: what the exported program was specialised to."""
    out = []
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        out.append([list(x.shape), str(x.dtype), str(getattr(sharding, "spec", None)),
                    None if mesh is None else [list(mesh.axis_names), [int(d.id) for d in mesh.devices.flat]]])
    return out


# Config keys the traced train and eval steps cannot depend on: the seed (it draws initial values, which are
# arguments), the cadence of logging, evaluation, sampling and checkpoints, early stopping (decided on the host)
# and the analysis settings.  Left out of the key, so runs that differ only there (a study's seeds, another
# eval_every) share entries; tests/train/test_step_cache.py checks that changing each leaves the program unchanged.
UNTRACED_KEYS = ("seed", "train.log_every", "train.eval_every", "train.eval_batches", "train.sample_length",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.stop_at_accuracy", "analysis")


def run_key(config, spec) -> str:
    """The caller's part of the key: the config but its UNTRACED_KEYS, and the tokenizer's ids the step uses."""
    traced = config.to_dict()
    for dotted in UNTRACED_KEYS:
        *path, leaf = dotted.split(".")
        section = traced
        for name in path:
            section = section.get(name, {})
        section.pop(leaf, None)
    return json.dumps({"config": traced, "vocab_size": spec.vocab_size, "mask_id": spec.mask_id,
                       "special_ids": list(spec.special_ids)}, sort_keys=True, default=str)


def entry_key(key: str, *args) -> str:
    """The cache key of a step program for these arguments (e.g. state, batch)."""
    parts = {"key": key, "source": source_digest(), "versions": _versions(),
             "flags": {f: str(getattr(jax.config, f, None)) for f in _TRACE_FLAGS},
             "platform": jax.devices()[0].platform, "device_count": jax.device_count(),
             "trees": [str(jax.tree.structure(a)) for a in args],
             "leaves": _describe(jax.tree.leaves(args))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def cached_train_step(step: Callable, state, batch, *, key: str, directory: str, state_shardings,
                      replicated) -> Callable:
    """jit(step) with its traced program loaded from `directory` when an entry for these arguments exists.

    step: (state, batch) -> (new state with the structure of `state`, dict of replicated metrics).
    Returns a function of (state, batch) with the same results as ``jax.jit(step, out_shardings=...,
    donate_argnums=0)``: the state's buffers are donated.
    """
    state_def, batch_def = jax.tree.structure(state), jax.tree.structure(batch)
    leaf_shardings = jax.tree.leaves(state_shardings)

    def flat_step(state_leaves, batch_leaves):
        new_state, metrics = step(jax.tree.unflatten(state_def, state_leaves),
                                  jax.tree.unflatten(batch_def, batch_leaves))
        if jax.tree.structure(new_state) != state_def:
            raise ValueError("the train step changed the state's tree structure")
        return jax.tree.leaves(new_state), metrics

    run = _stored_program(
        os.path.join(directory, f"train_step-{entry_key(key, state, batch)}.jaxexport"),
        jax.jit(flat_step, out_shardings=(leaf_shardings, replicated)),
        (jax.tree.leaves(state), jax.tree.leaves(batch)),
        out_shardings=(leaf_shardings, replicated), donate_argnums=(0,))

    def cached_step(state, batch):
        leaves, metrics = run(jax.tree.leaves(state), jax.tree.leaves(batch))
        return jax.tree.unflatten(state_def, leaves), metrics
    return cached_step


def cached_eval_step(step: Callable, *, key: str, directory: str, out_shardings=None) -> Callable:
    """jit(step) for step(params, batch, carry) -> (sums, carry), each argument signature's traced program
    loaded from `directory` when stored (a relaunch's first evaluation skips tracing the model too).

    The parameters' tree is passed flat (jax.export serializes dicts, lists, tuples and None, not nnx.State);
    batch, carry, sums and the new carry are such containers already.  Same results as
    ``jax.jit(step, out_shardings=out_shardings)``; give the carry its input's sharding there, so that the
    next batch's call has the same signature (a stored program per signature).
    """
    programs: dict = {}

    def cached_eval(params, batch, carry):
        arrays, tree = jax.tree.flatten((params, batch, carry))
        signature = (tree, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in arrays))
        leaves = jax.tree.leaves(params)
        if signature not in programs:
            params_def = jax.tree.structure(params)
            programs[signature] = _stored_program(
                os.path.join(directory, f"eval_step-{entry_key(key, params, batch, carry)}.jaxexport"),
                jax.jit(lambda p, b, c: step(jax.tree.unflatten(params_def, p), b, c), out_shardings=out_shardings),
                (leaves, batch, carry), out_shardings=out_shardings)
        return programs[signature](leaves, batch, carry)
    return cached_eval


def _stored_program(path: str, jitted: Callable, args: tuple, **jit_kwargs) -> Callable:
    """A function of `args`-like arguments running the program stored at `path`, or `jitted` exported for
    `args` and stored there first; `jit_kwargs` (out_shardings, donate_argnums) as the caller's jit."""
    exported = _load(path)
    if exported is None:
        exported = jax.export.export(jitted)(*args)
        _store(path, exported.serialize())
    run = jax.jit(exported.call, **jit_kwargs)
    lowered = []   # the first call lowers the stored program; later calls go straight to the executable

    def call(*call_args):
        if lowered:
            return run(*call_args)
        with _lapack_only_if_called(exported):
            out = run(*call_args)
        lowered.append(True)
        return out
    return call


@contextlib.contextmanager
def _lapack_only_if_called(exported):
    """Lowering a call of an Exported loads jaxlib's LAPACK bindings (importing scipy.linalg: 0.2 s here, most
    of a warm start) in case the program calls LAPACK; skip that when it has no LAPACK custom call (their
    targets are named lapack_*; the word in a source location of the module only means no skipping).

    Patches a private hook of the pinned jax; if jax moves it, this does nothing and the bindings load as usual.
    """
    hook = getattr(_jax_export_internals, "_ensure_backends_initialized", None)   # None if jax moved it
    if hook is None or b"lapack" in bytes(exported.mlir_module_serialized):
        yield
        return
    _jax_export_internals._ensure_backends_initialized = lambda platforms: None
    try:
        yield
    finally:
        _jax_export_internals._ensure_backends_initialized = hook


def _load(path: str):
    """The Exported stored at `path`, or None (missing, or unreadable: then it is rewritten)."""
    try:
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        os.utime(path)   # last use: what pruning keeps
        return exported
    except FileNotFoundError:
        return None
    except Exception as e:   # a damaged or foreign file: never fatal, the step is traced again
        logging.warning("ignoring unreadable step cache entry %s (%s: %s)", path, type(e).__name__, e)
        return None


def _store(path: str, data: bytes) -> None:
    """Write atomically (temp file + rename), so a killed process or a concurrent writer leaves no torn entry."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        _prune(os.path.dirname(path))
    except OSError as e:   # a read-only or full disk costs the next launch a trace, nothing more
        logging.warning("could not write step cache entry %s: %s", path, e)


def _prune(directory: str) -> None:
    """Delete all but the MAX_ENTRIES most recently used entries (another process may be pruning too)."""
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".jaxexport"):
            with contextlib.suppress(FileNotFoundError):
                entries.append((os.path.getmtime(os.path.join(directory, name)), name))
    for _, name in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
