"""`mm-convert`: the checkpoint converter's command (hf_to_mm, mm_to_hf, resplit).

The console script is installed now so that the name is reserved; the converter itself is not written
yet and this says so instead of failing with an import error.
"""
import sys


def main(argv=None) -> int:
    print("mm-convert: the converter (hf_to_mm, mm_to_hf, resplit) is not implemented yet in this version; "
          "mindspeed_mm.models.internvl.hf_mapping and mindspeed_mm.parallel.sharding hold the mapping "
          "and per-rank slicing it will use.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
