"""torchrun worker: run the tiny model at one layout, save this rank's losses and tensor slices.
argv: HF_DIR OUT_DIR LAYOUT_ARGS_JSON [OUT_DIR LAYOUT_ARGS_JSON ...]: several layouts run one after the other
in the same launch (one start-up paid); they must share tp, pp, cp and vpp (the groups are made once)."""
import sys

from mindspeed_mm.device import apply_device_adaptor


def main() -> None:
    apply_device_adaptor(force=True)
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from tests.helpers.layout_check import LayoutArgs, run_layout, save_rank_result

    hf_dir, rest = sys.argv[1], sys.argv[2:]
    runs = [(rest[i], LayoutArgs.from_json(rest[i + 1])) for i in range(0, len(rest), 2)]
    groups = {(a.tp, a.pp, a.cp, a.vpp) for _, a in runs}
    assert len(rest) % 2 == 0 and len(groups) == 1, f"expected OUT_DIR ARGS pairs at one (tp, pp, cp, vpp): {rest}"
    init_distributed(backend="gloo")
    args = runs[0][1]
    initialize_model_parallel(tp=args.tp, pp=args.pp, cp=args.cp, vpp=args.vpp)
    for out_dir, args in runs:
        save_rank_result(out_dir, run_layout(hf_dir, args))
    destroy_distributed()


if __name__ == "__main__":
    main()
