"""train(config, workdir): the only orchestration — set-up, the step loop, periodic eval, checkpoints, signals.

The loop fetches metrics from the device only every `train.log_every` (<= 32) steps: that bounds the
number of queued steps, which keeps XLA:CPU collectives from deadlocking (JAX-NOTES.md §1.3), and keeps
the host out of the way of the device. Checkpoints are written only after the pending metrics were checked
finite, so a diverged run keeps its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import time

import jax
import numpy as np
from flax import nnx

from jaxlm import checkpoint, data, generate, metric_writer, models, parallel, perf, preflight, step_cache
from jaxlm import config as config_lib
from jaxlm.errors import DivergedError, Interrupted, UserError
from jaxlm.train import optim, state as state_lib, step as step_lib


@dataclasses.dataclass
class Run:
    """Everything set-up builds for one run; the loop and eval read from it."""

    config: object
    workdir: str
    dataset: object
    graphdef: object
    spec: step_lib.StepSpec
    dp: parallel.DataParallel
    checkpointer: checkpoint.Checkpointer
    writer: metric_writer.MetricWriter
    state: object
    start_step: int
    flops_per_token: float
    num_params: int
    model_initial_carry: object = None   # batch_size -> zero recurrent state (stateful runs)
    stopped_at: int | None = None        # the step train.stop_at_accuracy stopped training at (resumed runs too)


def setup(config, workdir: str, *, restart: bool = False, for_training: bool = True) -> Run:
    """Data, model, optimizer, placement, and the state: restored from the latest complete checkpoint if any."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if restart and jax.process_index() == 0:
        _set_aside_previous_run(workdir)
    _check_resume_config(config, workdir, ckpt_dir)
    reason = parallel.check_batch_divisible(config.train.batch_size, config.train.grad_accum_steps)
    if reason:
        raise UserError(reason)
    dataset = data.build_dataset(config, workdir)
    tx = optim.from_config(config)
    checkpointer = checkpoint.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
    resuming = bool(checkpointer.steps())   # then the checkpoint holds every value: build shapes only
    model, params, carry = model_and_params(config, dataset.tokenizer.vocab_size, abstract=resuming)
    restored = (checkpointer.restore_latest(state_lib.checkpoint_target(params, tx, config.seed, carry))
                if resuming else None)
    start_step, stopped_at = 0, None
    if restored is not None:
        start_step, host_state, meta = restored
        host_state = tx.from_checkpoint(host_state)
        reached = meta.get("stopped_at_accuracy") or 0.0   # the threshold it stopped at, if it did
        if 0 < config.train.stop_at_accuracy <= reached:
            stopped_at = start_step   # it stopped there once solved (0 or a stricter threshold trains on)
    elif not for_training:
        checkpointer.close()
        raise preflight.no_checkpoint(workdir)
    else:
        if resuming:   # its steps vanished between listing and restoring (another process cleared them)
            model, params, carry = model_and_params(config, dataset.tokenizer.vocab_size, abstract=False)
        host_state = fresh_state(params, tx, config, carry)
    graphdef = nnx.graphdef(model)
    spec, dp = make_steps(config, graphdef, tx, dataset.tokenizer)
    if for_training and start_step > config.train.steps:
        checkpointer.close()
        raise UserError(f"workdir {workdir!r} holds a run trained to step {start_step}, beyond "
                        f"train.steps={config.train.steps}: raise train.steps, or --restart to set the old run aside")
    if jax.process_index() == 0 and for_training:
        config_lib.save(config, workdir)
    writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0 and for_training,
                                        total_steps=config.train.steps, resume_step=int(start_step))
    flops = models.FLOPS_PER_TOKEN[config.model.name](config.model, dataset.tokenizer.vocab_size, config.data.seq_len)
    return Run(config=config, workdir=workdir, dataset=dataset, graphdef=graphdef, spec=spec, dp=dp,
               checkpointer=checkpointer, writer=writer, state=dp.place_state(host_state), start_step=int(start_step),
               flops_per_token=flops, num_params=models.count_params(params),
               model_initial_carry=lambda b: jax.tree.map(np.asarray, model.initial_carry(b)), stopped_at=stopped_at)


def model_and_params(config, vocab_size: int, *, abstract: bool):
    """(model, its Param state, the zero recurrent carry of a stateful run or None); abstract: shapes only."""
    model = models.build_model(config.model, vocab_size, config.seed, abstract=abstract)
    carry = model.initial_carry(config.train.batch_size) if config.train.stateful else None
    return model, nnx.state(model, nnx.Param), carry


def fresh_state(params, tx, config, carry=None):
    """The TrainState of a run's step 0, as host numpy (DataParallel.place_state lays it out)."""
    return jax.tree.map(np.asarray, state_lib.TrainState.create(params, tx, config.seed, carry))


def make_steps(config, graphdef, tx, tokenizer) -> tuple[step_lib.StepSpec, parallel.DataParallel]:
    """The run's StepSpec and its train/eval steps wrapped for `config.parallel` (strategy, fsdp, step cache)."""
    spec = step_lib.StepSpec.from_config(config, graphdef, tx, tokenizer,
                                         axis_name=parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None)
    dp = parallel.DataParallel(config.parallel.strategy, *step_lib.bind(spec), fsdp=config.parallel.fsdp,
                               step_cache_key=step_cache.run_key(config, spec))
    return spec, dp


def _set_aside_previous_run(workdir: str) -> None:
    """--restart: move the old checkpoints and logs to WORKDIR/previous-<time>/ (nothing is deleted)."""
    if not os.path.isdir(workdir):
        return
    names = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")
             or n in ("checkpoints", "metrics.jsonl", "config.json", "tokenizer.json", "analysis", "study_run.json")]
    if not names:
        return
    target = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
    os.makedirs(target)
    for name in names:
        shutil.move(os.path.join(workdir, name), os.path.join(target, name))


def _check_resume_config(config, workdir: str, ckpt_dir: str) -> None:
    """A workdir with checkpoints resumes only under a compatible config (DESIGN.md: name the differing keys)."""
    if not (os.path.isdir(ckpt_dir) and os.path.exists(os.path.join(workdir, "config.json"))):
        return
    conflicts = config_lib.resume_conflicts(config_lib.load(workdir), config)
    if conflicts:
        saved = config_lib.flatten(config_lib.load(workdir))
        now = config_lib.flatten(config)
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {now.get(k)!r}" for k in conflicts)
        raise UserError(f"workdir {workdir!r} holds a run with a different config ({detail}); "
                        "use another --workdir, or --restart to set the old run aside")


class _SignalFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 130. A second SIGINT: stop at once."""

    def __init__(self):
        self.raised = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread (e.g. a test harness): no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.raised is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config, workdir: str, *, restart: bool = False) -> dict:
    """Train to config.train.steps (resuming if the workdir has a checkpoint); returns the final eval metrics.

    With ``train.stop_at_accuracy`` > 0 training ends early once a logged train/accuracy reaches it; the final
    eval, the checkpoint and ``train/steps_trained`` are then at that step (a rerun does not train on)."""
    run = setup(config, workdir, restart=restart)
    # The flag stays installed over the final eval and save, and over closing the checkpointer (which waits for
    # an async save to finalize): a first signal there lets them finish instead of interrupting the save.
    with _SignalFlag() as signals:
        try:
            _log_start(run)
            last = run.stopped_at or _train_loop(run, signals)
            final = evaluate(run, last)
            _save(run, last)
            return {**final, "train/steps_trained": last}
        except KeyboardInterrupt:
            # A second Ctrl-C stops at once. If it cut an async save short as Orbax started its writer thread,
            # closing fails ("cannot join thread before it is started"); the last complete checkpoint is what
            # counts, so the interrupt (exit 130) must not turn into that traceback.
            with contextlib.suppress(Exception):
                run.checkpointer.close()
            raise
        finally:
            run.checkpointer.close()   # idempotent: a no-op once closed above
            run.writer.close()


def _log_start(run: Run) -> None:
    c = run.config
    what = "resuming from step %d" % run.start_step if run.start_step else "starting"
    run.writer.log(f"{c.model.name}: {run.num_params:,} parameters, {run.flops_per_token / 1e6:.2f} MFLOP/token, "
                   f"vocab {run.dataset.tokenizer.vocab_size}, {len(run.dp.devices)} device(s), {c.parallel.strategy}; "
                   f"{what} -> {c.train.steps} steps; workdir {run.workdir}")
    for note in config_lib.caveats(c):
        run.writer.log(f"note: {note}")
    if run.start_step == 0:
        run.writer.write_text(0, "config", "```\n" + c.to_json_best_effort(indent=2) + "\n```")
        hparams = {k: v for k, v in config_lib.flatten(c).items() if isinstance(v, (bool, int, float, str))}
        hparams["num_params"] = run.num_params
        run.writer.write_hparams(hparams, ["eval/loss", "eval/perplexity", "train/loss"])


def _train_loop(run: Run, signals: _SignalFlag) -> int:
    """Steps from run.start_step; returns the last step trained (train.steps, or where stop_at_accuracy hit)."""
    c = run.config.train
    pending, last_time, last_step = [], None, run.start_step
    peak = perf.global_peak_flops(run.config.model.dtype)
    tokens_per_step = c.batch_size * run.config.data.seq_len
    skipped = 0
    for step in range(run.start_step, c.steps):
        local = run.dataset.train_batch(step, c.batch_size, stateful=c.stateful,
                                        process_index=jax.process_index(), process_count=jax.process_count())
        run.state, metrics = run.dp.train_step(run.state, run.dp.place_batch(local))
        pending.append(metrics)
        done = step + 1
        if last_time is None:      # the first step includes compilation: time from its end
            jax.block_until_ready(metrics)
            last_time, last_step = time.perf_counter(), done
        raised = signals.raised
        if jax.process_count() > 1:   # every process must stop (and checkpoint) at the same step
            raised = parallel.agree_on_signal(raised) if done % c.log_every == 0 else None
        if done % c.log_every == 0 or done == c.steps or raised or done % c.checkpoint_every == 0:
            if pending:
                means = _write_train_metrics(run, done, pending, last_time, last_step, tokens_per_step, peak,
                                             skipped)
                skipped = means.get("train/skipped_steps", 0)
                last_time, last_step, pending = time.perf_counter(), done, []
                if 0 < c.stop_at_accuracy <= means["train/accuracy"] and done < c.steps:
                    run.writer.log(f"step {done}: train/accuracy {means['train/accuracy']:.4f} >= "
                                   f"train.stop_at_accuracy={c.stop_at_accuracy}: training stops here")
                    run.stopped_at = done
                    return done
        if done % c.eval_every == 0 and done != c.steps:
            evaluate(run, done)
        if (done % c.checkpoint_every == 0 and done != c.steps) or raised:
            _save(run, done)
        if raised:
            run.writer.log(f"{raised}: checkpoint saved at step {done}; rerun the same command to resume")
            raise Interrupted(f"interrupted by {raised} at step {done}; checkpoint saved")
    return int(c.steps)


def _write_train_metrics(run, step, pending, since_time, since_step, tokens_per_step, peak, skipped) -> dict:
    """Fetch the pending per-step metrics (blocks on the device), check them, log and return their means."""
    host = jax.device_get(pending)
    elapsed = time.perf_counter() - since_time
    n_steps = max(step - since_step, 1)
    nonfinite = int(sum(m["train/nonfinite"] for m in host))
    if nonfinite and not run.spec.skip_nonfinite:
        bad = step - len(host) + next(i for i, m in enumerate(host) if m["train/nonfinite"]) + 1
        good = run.checkpointer.steps()
        raise DivergedError(f"non-finite loss or gradients at step {bad}; last good checkpoint: "
                            f"{'step %d' % good[-1] if good else 'none'} (train.skip_nonfinite=True skips such steps)")
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "train/nonfinite"}
    tokens_per_sec = tokens_per_step * n_steps / elapsed if step > since_step else float("nan")
    means.update({"train/learning_rate": float(optim.learning_rate_schedule(run.config.optim, run.config.train.steps)(step - 1)),
                  "train/tokens_per_sec": tokens_per_sec, "train/step_time_ms": 1000 * elapsed / n_steps,
                  "train/mfu": tokens_per_sec * run.flops_per_token / peak if peak else float("nan")})
    if run.spec.objective == "masked_lm":
        means["train/masked_accuracy"] = means["train/accuracy"]
    if run.spec.skip_nonfinite:
        means["train/skipped_steps"] = skipped + nonfinite
    run.writer.write_scalars(step, means)
    run.writer.progress(step, loss=means["train/loss"], tokens_per_sec=tokens_per_sec)
    return means


def _save(run: Run, step: int) -> None:
    stopped = run.config.train.stop_at_accuracy if run.stopped_at == step else 0.0
    meta = {"config": run.config.to_dict(), "step": step, "stopped_at_accuracy": stopped}
    run.checkpointer.save(step, run.spec.optimizer.to_checkpoint(run.dp.to_host(run.state)), meta)


def evaluate(run: Run, step: int, *, write: bool = True) -> dict:
    """Mean objective over the fixed validation batches; writes eval/* scalars and a text sample."""
    totals, carry = None, None
    stateful = run.config.train.stateful
    if stateful:   # evaluate over contiguous valid streams, carrying the state from a zero start
        carry = run.dp.place_carry(run.model_initial_carry(run.config.train.batch_size // jax.process_count()))
    for batch in run.dataset.eval_batches(run.config.train.batch_size, run.config.train.eval_batches,
                                          stateful=stateful, process_index=jax.process_index(),
                                          process_count=jax.process_count()):
        sums, carry = run.dp.eval_step(run.state, run.dp.place_batch(batch), carry)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    summary = {k.replace("train/", "eval/"): float(v) for k, v in step_lib.summarize(totals).items()}
    loss = summary["eval/loss"]
    summary["eval/perplexity"] = math.exp(min(loss, 80.0))
    per = "char" if run.config.data.tokenizer in ("bytes", "chars") else "token"
    summary[f"eval/bits_per_{per}"] = loss / math.log(2)
    if run.spec.objective == "masked_lm":
        summary["eval/masked_accuracy"] = summary["eval/accuracy"]
    if write:
        run.writer.write_scalars(step, summary)
        run.writer.log(f"step {step}: eval loss {loss:.4f}, perplexity {summary['eval/perplexity']:.2f}")
        _write_sample(run, step)
    return summary


def _write_sample(run: Run, step: int) -> None:
    """A generated continuation of the start of the validation split, as TensorBoard text."""
    if run.spec.objective != "causal_lm" or not run.config.train.sample_length:
        return
    prompt = run.dataset.valid_tokens[:16]
    text = generate.sample(run.graphdef, run.dp.params(run.state), prompt, max_len=run.config.model.max_len,
                           num_tokens=run.config.train.sample_length, seed=step)
    tok = run.dataset.tokenizer
    run.writer.write_text(step, "samples/text", f"**{tok.decode(prompt)}**{tok.decode(text)}")
