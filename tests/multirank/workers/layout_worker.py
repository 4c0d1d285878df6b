"""torchrun worker: run the tiny model at one layout, save this rank's losses and tensor slices.
argv: HF_DIR OUT_DIR LAYOUT_ARGS_JSON"""
import sys

from mindspeed_mm.device import apply_device_adaptor


def main() -> None:
    apply_device_adaptor(force=True)
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from tests.helpers.layout_check import LayoutArgs, run_layout, save_rank_result

    hf_dir, out_dir, args = sys.argv[1], sys.argv[2], LayoutArgs.from_json(sys.argv[3])
    init_distributed(backend="gloo")
    initialize_model_parallel(tp=args.tp, pp=args.pp, cp=args.cp, vpp=args.vpp)
    save_rank_result(out_dir, run_layout(hf_dir, args))
    destroy_distributed()


if __name__ == "__main__":
    main()
