"""`pretrain_vlm.py`: finetune InternVL3 with megatron-core from the reference recipe's flags and JSON specs.

Flow: parse flags -> process groups -> model spec and layout plan -> this rank's model chunks in megatron DDP
-> optimizer and schedule -> `--load` (any saved layout) -> the data of this DP rank -> steps, logged every
`--log-interval`, saved every `--save-interval` and at the end.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from mindspeed_mm.errors import run_main

# torch is imported where it is used: `main` checks the flags and the input files before paying for it.

__all__ = ["main", "train", "check_inputs"]


@dataclasses.dataclass
class RunState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    skipped_iterations: int = 0
    loaded: Counter = dataclasses.field(default_factory=Counter)  # used samples' load notes (truncated images)


def _is_last_stage_rank() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def _broadcast_from_last_stage(value: float) -> float:
    """The loss lives on the last pipeline stage; every rank logs the same number."""
    import torch
    from megatron.core import parallel_state

    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(t, src=src, group=group)
    return float(t.item())


def _broadcast_all_from_last_stage(values: list[float]) -> list[float]:
    import torch
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return t.tolist()


def validate(model, loader, eval_iters: int, num_micro: int, iteration: int) -> dict:
    """One evaluation: the first `eval_iters` global batches of the validation set, forward only, and the
    record of its token-mean loss (every rank returns the same record).

    The torch RNG is left as it was: building the loader's iterator draws a seed from it, and a run with
    validation must train exactly as one without."""
    import torch
    from mindspeed_mm.training.metrics import validation_ppl
    from mindspeed_mm.training.pipeline import evaluate

    t0 = time.perf_counter()
    cuda = torch.distributed.get_backend() == "nccl"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        batches = iter(loader)
        groups = ([next(batches) for _ in range(num_micro)] for _ in range(eval_iters))
        reports, samples = [], 0
        for group in groups:
            samples += sum(int(mb["input_ids"].shape[0]) for mb in group)
            reports += evaluate(model, [group])
    total, count = 0.0, 0.0
    if _is_last_stage_rank():  # the reports live there; its DP group is all last-stage ranks
        total, count = _dp_sum([sum(float(r[0]) for r in reports), sum(float(r[1]) for r in reports)])
    total, count = _broadcast_all_from_last_stage([total, count])
    (samples,) = _dp_sum([samples])
    loss = total / count if count else float("nan")
    return {"record": "validation", "iteration": iteration, "validation_loss": loss,
            "validation_ppl": validation_ppl(loss) if count else float("nan"), "validation_tokens": int(count),
            "validation_samples": int(samples), "validation_s": time.perf_counter() - t0}


def _dp_sum(values: list[float]) -> list[float]:
    import torch
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


def _attended_lengths(mb) -> list[int]:
    """The lengths attention runs over: each padded row, or in a pack each sample (attention stays inside it)."""
    import torch

    ids = mb.get("sample_ids")
    if ids is None:
        return [int(mb["input_ids"].shape[1])] * int(mb["input_ids"].shape[0])
    return [int(n) for row in ids for n in torch.bincount(row[row >= 0]).tolist() if n]


def _real_tiles(mb) -> int:
    """Tiles the ViT runs on (InternVL's strict_mode pads packs with flagged-off tiles)."""
    if mb.get("num_tiles") is not None:
        return int(mb["num_tiles"])
    pv = mb.get("pixel_values")
    return int(pv.shape[0]) if pv is not None else 0


def _peak_tflops(args) -> Optional[float]:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    from mindspeed_mm.training.flops import PEAK_TFLOPS

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _parallel_sizes(args, world: Optional[int] = None):
    """The flags' sizes on `world` ranks; without it, on the fewest the flags allow (the checks before launch)."""
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.training.arguments import ArgumentError

    kw = dict(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
              cp=args.context_parallel_size, vpp=args.virtual_pipeline_model_parallel_size, sp=args.sequence_parallel,
              ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)
    try:
        return ParallelSizes.smallest(**kw) if world is None else ParallelSizes.from_world_size(world, **kw)
    except ValueError as e:  # it names its own fields: say which flags set them
        raise ArgumentError(f"{e}; set by --tensor-model-parallel-size, --pipeline-model-parallel-size, "
                            "--context-parallel-size, --virtual-pipeline-model-parallel-size, "
                            "--expert-model-parallel-size and --expert-tensor-parallel-size") from None


def check_inputs(args):
    """The model and data JSON, the layout and the files they and the flags name, checked before torch,
    megatron or any process group: bad input fails in a second and on every rank alike, so no rank waits in a
    collective for one that stopped. Only the number of processes is left to check. Returns (model spec with
    the flags' settings, data spec)."""
    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
    from mindspeed_mm.parallel.layout import LayoutError, LayoutNames, plan_layout
    from mindspeed_mm.training.arguments import ArgumentError, reconcile_with_spec

    spec, _ = reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)  # errors: device-independent
    try:  # the stage lists come from the model JSON: errors name its keys
        plan_layout(spec, _parallel_sizes(args), names=LayoutNames(
            "image_encoder.vision_encoder.pipeline_num_layers", "text_decoder.pipeline_num_layers"))
    except LayoutError as e:
        raise LayoutError(f"{e} (in {args.mm_model})") from None
    data_spec = load_data_spec(args.mm_data)
    param = data_spec.dataset_param
    tok = param.tokenizer_config.from_pretrained
    if not Path(tok).is_dir():
        raise DataSpecError("dataset_param.tokenizer_config.from_pretrained", f"no such directory: {tok}", args.mm_data)
    files = [(b, ("data_path", "data_folder") if b.source is None else ("annotation", "root"))
             for b in param.basic_parameters]  # a meta JSON's entries name their keys in the meta file
    files += [(b, ("valid_data_path", "valid_data_folder")) for b in param.valid_parameters]
    for basic, names in files:
        key, src = basic.key, basic.source or args.mm_data
        if not Path(basic.data_path).is_file():
            raise DataSpecError(f"{key}.{names[0]}", f"file not found: {basic.data_path}", src)
        if basic.data_folder is not None and not Path(basic.data_folder).is_dir():
            raise DataSpecError(f"{key}.{names[1]}", f"no such directory: {basic.data_folder}", src)
    if args.load and not Path(args.load).is_dir():
        raise ArgumentError(f"--load {args.load}: no such directory")
    if args.load_adapter:
        from mindspeed_mm.checkpoint.adapters import adapter_loras, with_loras

        if not args.load:
            raise ArgumentError("--load-adapter needs --load: the base checkpoint the adapters go on")
        if not Path(args.load_adapter).is_dir():
            raise ArgumentError(f"--load-adapter {args.load_adapter}: no such directory")
        spec = with_loras(spec, adapter_loras(args.load_adapter), f"--load-adapter {args.load_adapter}")
    return spec, data_spec


def train(args, spec, data_spec) -> RunState:
    """Train as `args` say; `spec` and `data_spec`: the model and data JSON, as `check_inputs` read them."""
    import torch
    from megatron.core import parallel_state
    from mindspeed_mm.checkpoint.mm_format import MMCheckpointMeta
    from mindspeed_mm.data.dataset import LOAD_NOTES, SKIP_REASONS
    from mindspeed_mm.data.packing import PACK_SKIP_REASONS
    from mindspeed_mm.data.tokenizer import load_tokenizer
    from mindspeed_mm.distributed import init_distributed, initialize_model_parallel
    from mindspeed_mm.parallel.layout import plan_layout
    from mindspeed_mm.training.arguments import ArgumentError, device_warnings
    from mindspeed_mm.training.checkpointing import load_checkpoint, save_checkpoint
    from mindspeed_mm.training.data import build_train_iterator, build_valid_loader, data_state, dataset_names
    from mindspeed_mm.training.flops import step_flops
    from mindspeed_mm.training.expert_load import step_figures
    from mindspeed_mm.training.loss import REPORT_KEY, LossMode, reduce_reported
    from mindspeed_mm.training.metrics import MetricsLogger, memory_stats
    from mindspeed_mm.training.optim import build_optimizer
    from mindspeed_mm.runtime.chunks import base_reference, build_model_chunks, load_adapter_dir
    from mindspeed_mm.training.pipeline import moe_reports, train_step, wrap_ddp

    init_distributed(args.distributed_backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logger = MetricsLogger(rank == 0, args.metrics_file, args.tensorboard_dir, train_iters=args.train_iters,
                           log_tps=args.log_tps)
    cuda = torch.distributed.get_backend() == "nccl"

    for w in device_warnings(args, cuda):  # `spec` is reconciled with the flags already (check_inputs)
        logger.info(f"warning: {w}")
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    parallel = _parallel_sizes(args, world)
    plan = plan_layout(spec, parallel, world)
    initialize_model_parallel(tp=tp, pp=pp, cp=cp, vpp=parallel.vpp, seed=args.seed,
                              embedding_pp_ranks=plan.tied_embedding_pp_ranks, ep=plan.parallel.ep,
                              etp=plan.parallel.etp)
    dp, dp_rank = parallel.dp, parallel_state.get_data_parallel_rank()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise ArgumentError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size {dp}")
    num_micro = gbs // (args.micro_batch_size * dp)
    packed = data_spec.dataset_param.packing.use_packed_ds  # then the batch sizes count packs
    loss_mode = LossMode.from_flags(args.calculate_per_sample_loss, args.calculate_per_token_loss,
                                    args.loss_reduction)
    logger.info(f"layout: world {world} = TP{tp} x PP{pp} x CP{cp} x DP{dp}"
                f"{f' (VPP {parallel.vpp})' if parallel.vpp else ''}{' +SP' if args.sequence_parallel else ''}"
                f"{f' (EP{plan.parallel.ep} x ETP{plan.parallel.expert_tp})' if plan.parallel.ep > 1 else ''}; "
                f"global batch {gbs}{' packs' if packed else ''} = {args.micro_batch_size} x {num_micro} "
                f"micro-batches x DP{dp}; "
                f"loss {loss_mode.value}")

    tok_dir = data_spec.tokenizer_config.from_pretrained
    tokenizer = load_tokenizer(data_spec.tokenizer_config, spec.img_context_token_id)

    chunks = build_model_chunks(spec, plan, args.context_parallel_algo, seed=args.seed)
    from mindspeed_mm.training.trainable_report import TrainableReport

    trainable = TrainableReport(chunks, spec, logger.info)  # what trains; the optimizer state after step 1
    preference = args.training_mode != "sft"
    model = wrap_ddp(chunks, args.use_distributed_optimizer, LossMode.DEFAULT if preference else loss_mode)
    optimizer, scheduler = build_optimizer(args, model)
    state = RunState()
    loaded_data_state = None
    meta = MMCheckpointMeta.from_plan(plan, spec, source_format="native", source_hf_dir=str(Path(tok_dir).absolute()),
                                      hf_config={})
    if args.load:
        loaded = load_checkpoint(args.load, model, plan, optimizer, scheduler, load_optim=not args.no_load_optim,
                                 load_rng=not args.no_load_rng, finetune=args.finetune, log=logger.info)
        state.iteration, state.consumed_train_samples = loaded.iteration, loaded.consumed_train_samples
        loaded_data_state = loaded.data_state
        meta = MMCheckpointMeta.from_plan(plan, spec, source_format=loaded.meta.source_format,
                                          source_hf_dir=loaded.meta.source_hf_dir or meta.source_hf_dir,
                                          hf_config=loaded.meta.hf_config)
        if not loaded.optimizer_loaded and state.iteration:
            scheduler.step(increment=state.iteration)  # the LR where the run left off
        if args.load_adapter:
            load_adapter_dir(args.load_adapter, chunks, log=logger.info)
            optimizer.reload_model_params()
        if spec.vision.lora or spec.text.lora:
            # saves hold the adapters and trainable parameters, and name the frozen base they go on
            meta = dataclasses.replace(meta, base=base_reference(loaded.checkpoint, chunks))
    else:
        logger.info("no --load: training from megatron's random initialisation")
    pref = None
    if preference:
        from mindspeed_mm.training.data import build_in_order_loader
        from mindspeed_mm.training.preference import (
            PreferenceState,
            build_reference,
            check_pairs,
            precompute_reference,
            preference_config,
            preference_step,
        )

        pref_cfg = preference_config(args)
        kind = args.reference_model or ("adapters_off" if spec.vision.lora or spec.text.lora else "copy")
        resumed = loaded.training_state if args.load else None

        def precompute():
            logger.info("reference log-probabilities: a first pass over the training set with the starting weights")
            loader = build_in_order_loader(data_spec, tokenizer, spec, args, dp_rank, dp)
            return precompute_reference(model, loader, num_micro, args.micro_batch_size)

        reference, info = build_reference(
            kind, model, chunks, spec, plan, args, resumed,
            build_chunks=lambda: build_model_chunks(spec, plan, args.context_parallel_algo, seed=args.seed),
            precompute=precompute)
        pref = PreferenceState(pref_cfg, reference, info=info)
        pref.load_state_dict(resumed)
        logger.info(f"{args.training_mode}: loss {' + '.join(f'{w:g} x {t}' for t, w in zip(pref_cfg.loss_types, pref_cfg.weights))}"
                    f"{f' + {pref_cfg.rpo_alpha:g} x sft' if pref_cfg.rpo_alpha is not None else ''}, beta "
                    f"{pref_cfg.beta:g}; reference: {kind}")

    batches = build_train_iterator(data_spec, tokenizer, spec, args, dp_rank, dp, state.consumed_train_samples,
                                   log=logger.info, num_micro=num_micro, state=loaded_data_state)
    names = dataset_names(data_spec)
    valid_loader = None
    if args.eval_interval and not data_spec.dataset_param.valid_parameters:
        # Megatron's behaviour, which the reference scripts rely on (they pass --eval-interval 5000 with none)
        where = ("dataset_param.valid_data_path" if data_spec.dataset_param.meta_path
                 else "dataset_param.basic_parameters.valid_data_path")
        logger.info(f"--eval-interval {args.eval_interval}: no validation set ({where} in {args.mm_data} names "
                    "none), so no validation loss is computed")
    elif args.eval_interval:
        valid_loader = build_valid_loader(data_spec, tokenizer, spec, args, dp_rank, dp, log=logger.info)
        valid_gbs, n_valid = args.micro_batch_size * num_micro * dp, len(valid_loader.dataset)
        wraps = ", wrapping around" if args.eval_iters * valid_gbs > n_valid else ""
        logger.info(f"validation: every {args.eval_interval} iterations and after the last, the first "
                    f"{args.eval_iters} x {valid_gbs} samples of the validation set ({n_valid} samples{wraps}"
                    f"{'; unpacked' if packed else ''}); loss: token mean")
    elif data_spec.dataset_param.valid_parameters:
        logger.info("the data JSON names a validation set; without --eval-interval it is not evaluated")
    last_validated = None

    def run_validation():
        nonlocal last_validated
        if valid_loader is not None and last_validated != state.iteration:
            rec = validate(model, valid_loader, args.eval_iters, num_micro, state.iteration)
            rec["consumed_samples"] = state.consumed_train_samples
            if not math.isfinite(rec["validation_loss"]):
                raise FloatingPointError(f"iteration {state.iteration}: validation loss is {rec['validation_loss']}")
            logger.log_validation(rec)
            last_validated = state.iteration

    def save():
        save_checkpoint(args.save, state.iteration, model, plan, meta, optimizer, scheduler,
                        state.consumed_train_samples, args.to_dict(), save_optim=not args.no_save_optim,
                        save_rng=not args.no_save_rng, log=logger.info, data_state=data_state(batches),
                        training_state=pref.state_dict() if pref is not None else None)

    peak = _peak_tflops(args)
    import psutil

    logger.info(f"start-up took {time.time() - psutil.Process().create_time():.1f} s; training iterations "
                f"{state.iteration + 1}..{args.train_iters}")
    window = Counter()
    last_saved = state.iteration if args.load else None
    while state.iteration < args.train_iters:
        t0 = time.perf_counter()
        microbatches = [next(batches) for _ in range(num_micro)]
        lr = scheduler.get_lr(optimizer.param_groups[0])  # the rate this step applies
        pref_metrics, moe_metrics = {}, {}
        if pref is not None:
            check_pairs(microbatches)
            reports, grad_norm, pref_metrics = preference_step(model, optimizer, microbatches, pref, gbs)
        else:
            reports, grad_norm = train_step(model, optimizer, microbatches, loss_mode=loss_mode,
                                            all_gather=args.loss_reduction_all_gather, full_reports=True)
            if spec.text.moe:
                moe_metrics = step_figures(moe_reports(reports), spec, _is_last_stage_rank(),
                                           next(model[0].parameters()).device)
            reports = [r[REPORT_KEY] for r in reports]
        trainable.after_step(optimizer, stepped=grad_norm is not None)
        scheduler.step(increment=1)
        state.iteration += 1
        state.consumed_train_samples += gbs
        if grad_norm is None:
            state.skipped_iterations += 1
        for mb in microbatches:
            state.skipped.update(mb.get("skipped") or {})
            window.update({("dataset", k): v for k, v in (mb.get("samples_by_dataset") or {}).items()})
            state.loaded.update(mb.get("loaded") or {})
        window.update(tokens=sum(int(mb["num_tokens"]) for mb in microbatches),
                      samples=sum(int(mb["num_samples"]) for mb in microbatches),
                      rows=sum(int(mb["input_ids"].shape[0]) for mb in microbatches),
                      tiles=sum(_real_tiles(mb) for mb in microbatches),
                      padded_tokens=sum(mb["input_ids"].numel() for mb in microbatches),
                      skipped_steps=int(grad_norm is None), time=time.perf_counter() - t0, steps=1)
        if cuda:
            seq_lens = [n for mb in microbatches for n in _attended_lengths(mb)]
            tiles = sum(int(mb["pixel_values"].shape[0]) for mb in microbatches if mb.get("pixel_values") is not None)
            window.update(flops=step_flops(spec, tiles, seq_lens).total)
        if packed:  # the same on every rank: the step's packs were balanced over DP by all ranks alike
            imbalance = max(window.get("tile_imbalance_max", 0.0), float(microbatches[0]["dp_tile_imbalance"]))
            window["tile_imbalance_max"] = imbalance
        loss = reduce_reported(reports) if _is_last_stage_rank() else float("nan")
        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            loss = _broadcast_from_last_stage(loss)
            reasons = SKIP_REASONS + PACK_SKIP_REASONS
            tokens, samples, rows, tiles, padded, flops, *rest = _dp_sum(
                [window["tokens"], window["samples"], window["rows"], window["tiles"], window["padded_tokens"],
                 window["flops"], *(state.skipped[r] for r in reasons), *(state.loaded[r] for r in LOAD_NOTES),
                 *(window[("dataset", n)] for n in names)])
            skipped, loaded, by_dataset = (rest[:len(reasons)], rest[len(reasons):len(reasons) + len(LOAD_NOTES)],
                                           rest[len(reasons) + len(LOAD_NOTES):])
            skipped_by_reason = {r: int(n) for r, n in zip(reasons, skipped) if n}
            loaded_by_note = {r: int(n) for r, n in zip(LOAD_NOTES, loaded) if n}
            elapsed = window["time"]
            record = {
                "record": "train", "iteration": state.iteration, "loss": loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                "step_time_s": elapsed / window["steps"], "consumed_samples": state.consumed_train_samples,
                "global_batch_size": gbs, "tokens_per_sample": padded / rows,
                "samples_per_step": samples / window["steps"], "tiles_per_step": tiles / window["steps"],
                "padding_fraction": 1.0 - tokens / padded if padded else 0.0,
                "loss_scale": float(optimizer.get_loss_scale()),
                "skipped_samples": sum(skipped_by_reason.values()), "skipped_iterations": state.skipped_iterations,
                "skipped_iterations_in_interval": window["skipped_steps"],
                "skipped_by_reason": skipped_by_reason,
                "samples_by_dataset": {n: int(c) for n, c in zip(names, by_dataset)},  # since the last record
                "loaded_by_note": loaded_by_note,
                **memory_stats(),
                **pref_metrics,  # the interval's last step
                **moe_metrics,  # the interval's last step
            }
            if packed:
                record["packs_per_step"] = rows / window["steps"]
                record["tile_imbalance"] = window["tile_imbalance_max"]  # the interval's worst step
            if cuda:
                # every model-parallel rank saw the same micro-batches: count each DP rank's work once
                tflops = flops / elapsed / 1e12 / (world // dp)
                record["tflops_per_gpu"] = tflops
                record["mfu"] = tflops / peak if peak else None
            if not math.isfinite(loss):
                raise FloatingPointError(f"iteration {state.iteration}: loss is {loss}")
            logger.log(trainable.add_to(record))
            window = Counter()
        if valid_loader is not None and state.iteration % args.eval_interval == 0:
            run_validation()
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save()
            last_saved = state.iteration
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            logger.info(f"exit interval: stopping after iteration {state.iteration}")
            break
    if valid_loader is not None:
        run_validation()  # Megatron's final evaluation; skipped when the last iteration was just evaluated
    if args.save and last_saved != state.iteration:
        save()
    if pref is not None:
        pref.reference.check_unchanged()
    logger.close()
    return state


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("pretrain_vlm.py", _main, argv)


def _main(argv: list[str]) -> int:
    from mindspeed_mm.training.arguments import parse_args

    args = parse_args(argv)
    spec, data_spec = check_inputs(args)
    import torch

    from mindspeed_mm.device import apply_device_adaptor
    from mindspeed_mm.distributed import destroy_distributed, parse_launch_env

    _parallel_sizes(args, parse_launch_env(os.environ).world_size)  # the number of processes, before megatron
    apply_device_adaptor()
    try:
        train(args, spec, data_spec)
    finally:
        if torch.distributed.is_initialized():
            destroy_distributed()
    return 0
