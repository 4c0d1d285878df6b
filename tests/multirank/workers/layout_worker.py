"""torchrun worker: run the tiny model at one layout, save this rank's losses and tensor slices.
argv: HF_DIR OUT_DIR LAYOUT_ARGS_JSON [OUT_DIR LAYOUT_ARGS_JSON | --hf-dir HF_DIR ...]: several layouts run one
after the other in the same launch (one start-up paid); megatron's groups are rebuilt only when a layout needs
other ones (tp, pp, cp, vpp, or the embedding group of tied embeddings on two stages). ``--hf-dir`` switches the
checkpoint for the layouts after it (other presets in the same launch)."""
import sys

from mindspeed_mm.device import apply_device_adaptor


def main() -> None:
    apply_device_adaptor(force=True)
    import torch

    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from tests.helpers.layout_check import LayoutArgs, layout_plan, run_layout, save_rank_result

    hf_dir, rest = sys.argv[1], sys.argv[2:]
    runs = []  # (hf_dir, out_dir, args)
    while rest:
        assert len(rest) >= 2, f"expected OUT_DIR ARGS pairs or --hf-dir HF_DIR: {sys.argv[1:]}"
        if rest[0] == "--hf-dir":
            hf_dir = rest[1]
        else:
            runs.append((hf_dir, rest[0], LayoutArgs.from_json(rest[1])))
        rest = rest[2:]
    init_distributed(backend="gloo")
    groups = None
    for hf_dir, out_dir, args in runs:
        _, plan = layout_plan(hf_dir, args, torch.distributed.get_world_size())
        wanted = (args.tp, args.pp, args.cp, args.vpp, plan.tied_embedding_pp_ranks, args.ep, args.etp)
        if wanted != groups:
            initialize_model_parallel(tp=args.tp, pp=args.pp, cp=args.cp, vpp=args.vpp,
                                      embedding_pp_ranks=plan.tied_embedding_pp_ranks, ep=args.ep, etp=args.etp)
            groups = wanted
        save_rank_result(out_dir, run_layout(hf_dir, args))
    destroy_distributed()


if __name__ == "__main__":
    main()
