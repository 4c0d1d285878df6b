"""megatron-core's optimizer and LR/weight-decay schedule, configured from the command line."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mindspeed_mm.training.arguments import ArgumentError, TrainArgs

__all__ = ["build_optimizer"]


def optimizer_config(args: TrainArgs) -> OptimizerConfig:
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=dtype, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer)


def build_optimizer(args: TrainArgs, model: list):
    """(optimizer, scheduler). The schedule counts optimizer steps; warm-up is `--lr-warmup-iters` or
    `--lr-warmup-fraction` of the decay iterations."""
    if args.use_distributed_optimizer and args.optimizer != "adam":
        raise ArgumentError("--use-distributed-optimizer needs --optimizer adam (megatron-core's restriction)")
    optimizer = get_megatron_optimizer(optimizer_config(args), model)
    decay = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ArgumentError("--lr-warmup-iters and --lr-warmup-fraction are mutually exclusive")
        warmup = int(args.lr_warmup_fraction * decay)
    else:
        warmup = args.lr_warmup_iters
    if warmup > decay:
        raise ArgumentError(f"warm-up ({warmup} iterations) is longer than the decay ({decay} iterations)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return optimizer, scheduler
