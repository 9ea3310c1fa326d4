"""The torchrun entry point: `python -m minitrain.train.worker RUN_DIR`, one process per rank.

Reads RUN_DIR/training_params.json (written by the parent, `minitrain.train.launch`) and never re-parses
command-line flags, so every rank trains with exactly the parameters that were validated and recorded.
`run(config)` assembles the pieces - process group, data, model, sharding, optimizer, schedule, metrics,
checkpoints - and hands them to `minitrain.train.loop.train_loop`. Trade-off: assembly is plain code in one
function rather than a registry of components; swapping a piece means editing this file.
"""

from __future__ import annotations

if __name__ == "__main__":  # a rank started by torchrun: Ctrl+C before the loop has nothing to save
    from minitrain.train.faults import start_quietly

    start_quietly()  # started with SIGINT/SIGTERM blocked; from here they end it quietly until StopFlag

import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from minitrain.config import TrainConfig
from minitrain.data.sampler import InfiniteSampler, split_validation
from minitrain.data.store import TokenStore, truncate
from minitrain.errors import UserError, first_line, say, signal_exit_code
from minitrain.rundir import METRICS_FILE, read_training_params, resolve_resume, scan_checkpoints
from minitrain.train.checkpoint import load_training_state, save_training_state
from minitrain.train.compile import compile_blocks
from minitrain.train.dist import (
    DistInfo,
    close_distributed,
    init_distributed,
    is_peer_loss,
    print0,
    stop_if_any_rank_failed,
)
from minitrain.train.evaluate import evaluate, evaluate_pairs, held_out_evaluator, plan_eval, plan_pair_eval
from minitrain.train.export import keep_best, merge_host_bytes, save_hf_checkpoint
from minitrain.train.faults import StopFlag, die_with_parent
from minitrain.train.loop import StopRule, TrainState, train_loop
from minitrain.train.metrics import (
    MetricsWriter,
    ProgressDisplay,
    matmul_params,
    model_flops_utilization,
    no_stop_rule_line,
    peak_flops_per_device,
)
from minitrain.train.model import CausalLMWithLoss, decoder_blocks, load_dtype, load_model, shard_model
from minitrain.train.optim import build_optimizer, build_scheduler
from minitrain.train.trackers import open_trackers


def run(config: TrainConfig, *, tokenizer_source: str | None, tear_down: bool = True) -> TrainState:
    """Train one rank's part of the run described by `config`; every rank calls this.

    `tear_down=False` (the torchrun entry point, which exits right after): on success every rank waits for
    the others and leaves the process group in place for `os._exit` to drop, see `main`.
    """
    die_with_parent()  # torchrun killed (second Ctrl+C) -> this rank dies too, no orphan keeps training
    dist = init_distributed()
    try:
        state = _train(config, dist, tokenizer_source)
        if not tear_down:
            if dist.world_size > 1:
                torch.distributed.barrier()  # every rank is done: none exits while a peer still trains
            return state
        close_distributed(synchronize=True)
        return state
    except BaseException:
        close_distributed()
        raise


def _train(config: TrainConfig, dist: DistInfo, tokenizer_source: str | None) -> TrainState:
    logging.basicConfig(level=config.logging_level if dist.is_main else "WARNING")
    _quiet_libraries(dist)
    on_gpu = dist.device.type == "cuda"
    # from-scratch weights are drawn on rank 0 and broadcast: the same on any world size
    torch.manual_seed(config.seed)
    store = TokenStore.open(config.data_path, config.objective)
    dpo = config.objective == "dpo"
    num_units = store.num_pairs if dpo else len(store)  # what the sampler draws: samples, or pairs
    unit = "pairs" if dpo else "samples"
    if config.truncate:  # over-long samples (pairs) keep their first tokens instead of being skipped
        store, _ = truncate(store, config.max_tokens_per_gpu, config.objective)
    trained_ids = held_out = None  # --validation-split: the sampler draws only trained_ids
    if config.validation_split is not None:
        trained_ids, held_out = split_validation(num_units, config.validation_split, config.seed)
    num_trained = num_units if trained_ids is None else len(trained_ids)

    # master weights: fp32 (bf16 compute on GPU through FSDP2's mixed precision) or bf16 with
    # --master-dtype bf16
    master_dtype = torch.bfloat16 if config.master_dtype == "bf16" else torch.float32
    lora = config.lora_settings()  # None: full fine-tuning
    error = None
    try:  # rank 0 reads what the other ranks receive later: a failure here must stop every rank cleanly
        lm, replicated = _build_model(config, lora, dist, master_dtype=master_dtype, on_gpu=on_gpu)
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = err
    stop_if_any_rank_failed(dist, error, stage="building the model")
    num_params, frozen_params = matmul_params(lm)
    use_liger = config.use_liger_kernels and on_gpu
    if config.use_liger_kernels and dpo and dist.is_main:  # Liger has no per-token weights
        say("minitrain: warning: --use-liger-kernels with --objective dpo: using the chunked cross-entropy")
    elif config.use_liger_kernels and not on_gpu and dist.is_main:  # a warning: stderr, as the parent's
        print(
            "minitrain: warning: --use-liger-kernels needs a GPU; using the chunked cross-entropy instead",
            file=sys.stderr,
            flush=True,
        )
    if config.compile:  # before sharding: FSDP2's hooks and checkpoint_wrapper stay outside the compiled code
        compile_blocks(decoder_blocks(lm))
        print0(dist, "--compile: the decoder blocks compile during the first step (and the first eval)")
    model = CausalLMWithLoss(lm, use_liger=use_liger)
    model = shard_model(
        model,
        dist=dist,
        strategy=config.fsdp_sharding_strategy,
        mixed_precision=on_gpu,
        master_dtype=master_dtype,
        cpu_offload=config.cpu_offload,
        activation_checkpointing=config.activation_checkpointing,
        replicated=replicated,
    )
    optimizer = build_optimizer(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay, device=dist.device,
        betas=(config.beta1, config.beta2), eps=config.eps,
    )  # fmt: skip
    total_steps = config.total_steps(num_trained)
    scheduler = build_scheduler(
        optimizer,
        name=config.lr_scheduler,
        num_warmup_steps=config.num_warmup_steps,
        num_training_steps=total_steps,
        scheduler_kwargs=config.scheduler_kwargs(),
    )
    sampler = InfiniteSampler(num_samples=num_trained, seed=config.seed, ids=trained_ids)
    state = TrainState()
    run_step = None  # the loop's SFT step
    if dpo:  # the reference is the initial model: before a resumed state is loaded
        run_step = _preference_step(config, model, store, dist)
    evaluate_now = None  # (for dpo: the eval pairs' reference too, so also before)
    if config.eval_data_path is not None:
        evaluate_now = _evaluator(config, model, dist)
    elif held_out is not None:
        evaluate_now = held_out_evaluator(
            model, store, held_out, max_tokens_per_gpu=config.max_tokens_per_gpu,
            validation_split=config.validation_split, dist=dist,
        )  # fmt: skip
    if config.resume is not None:
        checkpoint = _resume_point(config, dist)
        sampler_state, counters = load_training_state(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist
        )
        if sampler_state["num_samples"] != num_trained:
            held = "" if held_out is None else f" ({len(held_out)} held out by --validation-split)"
            raise UserError(
                f"{checkpoint} was trained on {sampler_state['num_samples']} {unit} but {config.data_path} "
                f"has {num_trained} to train{held}; resume with the same --data-path and --validation-split"
            )
        sampler = InfiniteSampler.from_state_dict(sampler_state, ids=trained_ids)
        state = TrainState(
            step=counters["step"], samples_seen=counters["samples_seen"], tokens_seen=counters["tokens_seen"],
            last_checkpoint_samples=counters["samples_seen"],
        )  # fmt: skip
        print0(dist, f"resumed from {checkpoint} at step {state.step} ({state.samples_seen} samples)")

    export_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        config.save_dtype, torch.bfloat16 if on_gpu else master_dtype
    )  # --save-dtype, else the compute dtype
    if lora is not None and config.merge_lora:
        from minitrain.train.adapters import logical_numel

        need = merge_host_bytes(sum(logical_numel(p) for p in lm.parameters()), master_dtype, export_dtype)
        print0(
            dist,
            "--merge-lora: each checkpoint merges the whole model in rank 0's host memory "
            f"(~{need / 1e9:,.1f} GB)",
        )

    def save(samples: int) -> Path:
        path = save_hf_checkpoint(
            model, model.lm, output_dir=config.output_dir, samples=samples, dist=dist, dtype=export_dtype,
            tokenizer_source=tokenizer_source, adapter=lora, merge_adapter=config.merge_lora,
            trust_remote_code=config.trust_remote_code,
        )  # fmt: skip
        # the full state last: a complete OUT/checkpoints/samples_N implies OUT/hf_format/samples_N exists
        counters = {"step": state.step, "samples_seen": samples, "tokens_seen": state.tokens_seen}
        save_training_state(
            config.output_dir, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
            counters=counters, dist=dist, keep_last=config.keep_last,
        )  # fmt: skip
        return path

    if config.save_best_val_loss and evaluate_now is not None:
        evaluate_now = keep_best(
            evaluate_now, config, model, state, dist, dtype=export_dtype, tokenizer_source=tokenizer_source
        )

    mfu = None
    peak = peak_flops_per_device(torch.cuda.get_device_name(dist.device)) if on_gpu else None
    if peak is not None:
        text = lm.config.get_text_config()
        mfu = functools.partial(
            model_flops_utilization, num_params=num_params, frozen_params=frozen_params,
            num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
            peak_flops=peak * dist.world_size,
        )  # fmt: skip
    held_note = "" if held_out is None else f" ({len(held_out):,} of {num_units:,} held out as the eval set)"
    print0(
        dist,
        f"training {config.model_name_or_path} on {num_trained:,} {unit}{held_note} with {dist.world_size} "
        f"{'GPU' if on_gpu else 'CPU process'}{'es' if dist.world_size > 1 and not on_gpu else ''}"
        f"{'s' if dist.world_size > 1 and on_gpu else ''}; writing to {config.output_dir}",
    )
    if total_steps is None:
        print0(dist, no_stop_rule_line(config.min_samples_per_checkpoint))
    metrics_path = Path(config.output_dir) / METRICS_FILE
    trackers, error = None, None
    try:
        trackers = open_trackers(config, store.meta) if dist.is_main else None  # --report-to, rank 0 only
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = err
    stop_if_any_rank_failed(dist, error, stage="starting the --report-to trackers")
    with (
        MetricsWriter(
            metrics_path,
            enabled=dist.is_main,
            continue_after_step=state.step if config.resume else None,
            trackers=trackers,
        ) as metrics,
        StopFlag(announce=dist.is_main) as stop,
    ):
        display = ProgressDisplay(total_steps=total_steps, enabled=dist.is_main)
        try:
            return train_loop(
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                store=store,
                sampler=sampler,
                dist=dist,
                batch_size=config.batch_size,
                max_tokens_per_gpu=config.max_tokens_per_gpu,
                max_grad_norm=config.max_grad_norm,
                stop=StopRule(config.max_steps, config.max_samples, config.max_epochs, config.max_tokens),
                min_samples_per_checkpoint=config.min_samples_per_checkpoint,
                save_checkpoint=save,
                metrics=metrics,
                display=display,
                mfu=mfu,
                state=state,
                stop_flag=stop,
                evaluate=evaluate_now,
                eval_every_samples=config.eval_every_samples,
                run_step=run_step,
                checkpoint_at_epoch=config.checkpoint_at_epoch,
            )
        finally:
            display.close()


def _preference_step(config: TrainConfig, model: torch.nn.Module, store: TokenStore, dist: DistInfo):
    """`--objective dpo`: the loop's step on pair indices, with its reference (None for SimPO/ORPO): the
    cached sums of the initial model (full fine-tuning), or the model with the new adapter off (adapters)."""
    from minitrain.train.dpo import preference_step

    objective = _objective(config)
    reference = None
    if objective.needs_reference:
        reference = _reference(config, model, store, dist, truncated=config.truncate)
    return functools.partial(
        preference_step, model, store, objective=objective, reference=reference, dist=dist,
        max_tokens_per_gpu=config.max_tokens_per_gpu,
    )  # fmt: skip


def _evaluator(config: TrainConfig, model: torch.nn.Module, dist: DistInfo):
    """`evaluate()` -> the eval metrics of --eval-data-path (eval_loss; for dpo also eval_rewards/...). For
    dpo with a reference, the eval pairs' reference is prepared here: before a resumed state is loaded."""
    if config.objective != "dpo":
        plan = plan_eval(
            TokenStore.open(config.eval_data_path),
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            world_size=dist.world_size,
        )
        skipped = f" ({plan.skipped} longer than --max-tokens-per-gpu skipped)" if plan.skipped else ""
        print0(dist, f"eval set: {plan.samples:,} samples, {plan.loss_tokens:,} trained tokens{skipped}")
        return lambda: {"eval_loss": evaluate(model, plan, dist=dist)}
    from minitrain.rundir import EVAL_REFERENCE_KEY_FILE, EVAL_REFERENCE_LOGPS_FILE

    store = TokenStore.open(config.eval_data_path, "dpo")
    pair_plan = plan_pair_eval(
        store, max_tokens_per_gpu=config.max_tokens_per_gpu, world_size=dist.world_size
    )
    skipped = f" ({pair_plan.skipped} longer than --max-tokens-per-gpu skipped)" if pair_plan.skipped else ""
    print0(dist, f"eval set: {pair_plan.pairs:,} pairs{skipped}")
    objective = _objective(config)
    reference = None
    if objective.needs_reference:
        files = (EVAL_REFERENCE_LOGPS_FILE, EVAL_REFERENCE_KEY_FILE)
        reference = _reference(config, model, store, dist, truncated=False, files=files)  # never cut
    return functools.partial(
        evaluate_pairs, model, pair_plan, objective=objective, reference=reference, dist=dist
    )


def _objective(config: TrainConfig):
    from minitrain.train.dpo import PreferenceObjective

    return PreferenceObjective(
        loss=config.preference_loss, beta=config.beta, simpo_gamma=config.simpo_gamma,
        sft_weight=config.sft_weight,
    )  # fmt: skip


def _reference(
    config: TrainConfig, model: torch.nn.Module, store: TokenStore, dist: DistInfo, *, truncated: bool, **kw
):
    """The DPO reference of `store`'s pairs (training or eval; `truncated`: cut by --truncate): computed per
    minibatch for an adapter run, else loaded from (or computed once into) the run directory's cache."""
    from minitrain.train.dpo import (
        adapter_reference,
        cached_reference,
        load_or_compute_reference,
        reference_key,
    )

    if config.lora_rank is not None:
        from minitrain.train.adapters import base_adapter_names, reference_adapters

        base_names = base_adapter_names(len(config.base_adapters))
        return adapter_reference(model, functools.partial(reference_adapters, model.lm, base_names))
    key = reference_key(
        data_path=store.path, model_name_or_path=config.model_name_or_path,
        from_scratch=config.from_scratch, seed=config.seed, master_dtype=config.master_dtype,
        base_adapters=tuple(Path(a) for a in config.base_adapters),
        max_tokens_per_gpu=config.max_tokens_per_gpu, truncate=truncated,
    )  # fmt: skip
    values = load_or_compute_reference(
        model, store, output_dir=config.output_dir, key=key, dist=dist,
        max_tokens_per_gpu=config.max_tokens_per_gpu, pairs_per_plan=config.batch_size, **kw,
    )  # fmt: skip
    return cached_reference(values)


def _build_model(
    config: TrainConfig, lora, dist: DistInfo, *, master_dtype: torch.dtype, on_gpu: bool
) -> tuple[torch.nn.Module, set | None]:
    """(the HF model, with the adapters of an adapter run; the 4-bit parameters FSDP2 must leave alone)."""
    quantization = None
    if config.load_in_4bit:  # QLoRA: NF4 base, matmuls in bf16 on GPU (in the master dtype on the CPU)
        from minitrain.train.adapters import nf4_config

        quantization = nf4_config(torch.bfloat16 if on_gpu else master_dtype)
    dtype = master_dtype
    if quantization is None:
        dtype = load_dtype(
            config.model_name_or_path,
            master_dtype,
            from_scratch=config.from_scratch,
            adapters=lora is not None,
        )
    lm = load_model(
        config.model_name_or_path,
        from_scratch=config.from_scratch,
        dtype=dtype,
        dist=dist,
        quantization=quantization,
        trust_remote_code=config.trust_remote_code,
    )
    if lora is None:
        return lm, None
    from minitrain.train.adapters import add_adapters, quantized_parameters, trainable_parameter_count

    # frozen base (+ frozen base adapters) and one new trainable LoRA adapter; the other ranks get rank 0's
    # weights when sharding, except with a 4-bit base: each rank loads its own
    lm = add_adapters(lm, lora, load_base_weights=dist.is_main or quantization is not None)
    trainable, total = trainable_parameter_count(lm)
    print0(dist, f"LoRA rank {lora.rank}: training {trainable:,} of {total:,} parameters")
    if quantization is None:
        return lm, None
    replicated = quantized_parameters(lm)
    print0(dist, f"4-bit NF4 base: {len(replicated):,} quantized tensors, a whole copy on every rank")
    return lm, replicated


def _quiet_libraries(dist: DistInfo) -> None:
    """Keep the libraries' noise out of the metric lines; what is left is what a user can act on.

    - transformers' "Loading weights" bar: rank 0's only (with a 4-bit base every rank loads), and only on a
      terminal.
    - PEFT calling a transformers API deprecated in v6 (a FutureWarning per rank, nothing to do for users).
    - bitsandbytes' CPU backend, imported by PEFT whenever bitsandbytes is installed, logging on every rank
      that an optional CPU kernel package is absent.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    if not dist.is_main or not sys.stderr.isatty():  # a bar in a log file is a wall of carriage returns
        hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _resume_point(config: TrainConfig, dist: DistInfo) -> Path:
    """Rank 0 picks the checkpoint (and reports leftovers of interrupted writes); every rank gets its
    choice."""
    import torch.distributed as torch_dist

    choice: list = [None]
    if dist.is_main:
        try:
            resume = config.resume_checkpoint()
            choice[0] = resolve_resume(config.output_dir, resume)
            for leftover in scan_checkpoints(config.output_dir).incomplete:
                print0(dist, f"minitrain: ignoring incomplete checkpoint {leftover} (an interrupted write)")
        except UserError as err:
            choice[0] = err
    if dist.world_size > 1:
        torch_dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], UserError):
        raise choice[0]
    return choice[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: read RUN_DIR/training_params.json and train; a user error is one line and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m minitrain.train.worker RUN_DIR  (started by `minitrain train`)", file=sys.stderr
        )
        return 2
    try:
        params = read_training_params(Path(args[0]))
        # the file says resume: null (it replays as a fresh run); this launch resumes from resumed_from
        config = TrainConfig.from_dict({**params, "resume": params.get("resumed_from")})
        state = run(config, tokenizer_source=params.get("tokenizer_source"), tear_down=False)
    except UserError as err:
        if os.environ.get("MINITRAIN_DEBUG"):
            raise
        say(f"minitrain: error (rank {os.environ.get('RANK', 0)}): {err}")
        return 1
    except Exception as err:
        if os.environ.get("MINITRAIN_DEBUG") or not is_peer_loss(err):
            raise
        first = first_line(err)
        say(
            f"minitrain: error (rank {os.environ.get('RANK', 0)}): lost another rank in a collective "
            f"({first}); the rank that failed first says why (MINITRAIN_DEBUG=1 shows this traceback)"
        )
        return 1
    return signal_exit_code(state.stop_signal) if state.stop_signal else 0  # 130 / 143 after a graceful stop


if __name__ == "__main__":
    # A finished rank leaves without tearing torch down: its C++ teardown of the gloo process group at
    # interpreter exit aborted a rank ("terminate called without an active exception", SIGABRT) in 2 of
    # about 30 two-rank CI launches, after everything was saved. Every file is written and closed by now,
    # so the rank flushes its streams and ends at once (a failure raised above still ends as before).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
