"""Tied input/output embeddings trained over pipeline stages, against the single-rank run.

With tied embeddings the LLM's first stage holds the token embeddings and the last stage a copy as its output
layer; training sums the copies' gradients over megatron's embedding group, built of the pipeline ranks that
hold them (training/pipeline.py). The layouts put the LLM's first stage where megatron's defaults would miss
it: a later chunk of pipeline rank 0, a chunk of the last rank itself, a middle rank. After 3 Adam steps both
copies must be bit-identical and equal the single rank's one tensor.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm.models.internvl.params import EMBEDDING, OUTPUT_LAYER
from mindspeed_mm.testing import tiny_checkpoint
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from tests.helpers.layout_check import LayoutArgs, layout_plan, load_rank_results, merge_rank_results, run_layout
from tests.multirank.test_layouts import PARAM_TOL, assert_close, assert_losses, run_many

# Qwen3 with tie_word_embeddings and 3 LLM layers, so that the LLM can span three stages
PRESET = "qwen3_tied_3"
# micro-batches per step over all DP ranks, one reference for every layout: 4 per DP rank at DP2, as PP2 x VPP2
# needs more than 2 on gloo (training/pipeline.py:_check_not_all_warmup) and megatron a multiple of PP
ADAM_STEPS, MICROBATCHES = 3, 8


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny_checkpoint.TINY_PRESETS, PRESET,
                   dataclasses.replace(tiny_checkpoint.TINY_PRESETS["qwen3_tied"], llm_layers=3))
        return {PRESET: write_tiny_checkpoint(root / PRESET, fmt="native", preset=PRESET, seed=7)}


@pytest.fixture(scope="module")
def reference(hf_dirs):
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    args = LayoutArgs(microbatches=MICROBATCHES, adam_steps=ADAM_STEPS)
    spec, plan = layout_plan(hf_dirs[PRESET], args, 1)
    yield merge_rank_results([run_layout(hf_dirs[PRESET], args)], spec, plan)
    destroy_distributed()


def _steps(dp: int = 1, **kw) -> LayoutArgs:
    return LayoutArgs(microbatches=MICROBATCHES // dp, adam_steps=ADAM_STEPS, **kw)


LAUNCHES = {
    # nproc: {name: (LayoutArgs, expected embedding-group pipeline ranks)}
    2: {
        # megatron's own placement: the LLM's embedding on pipeline rank 0, chunk 0
        "pp2_vit_and_llm_on_stage0": (_steps(pp=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[1, 2]]), (0, 1)),
        # the LLM starts on rank 0's second chunk: megatron would take rank 0's first (the ViT)
        "pp2_vpp2_llm_on_later_chunk": (_steps(pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]],
                                               llm_pp_layers=[[0, 0], [1, 2]]), (0, 1)),
        # the LLM starts on the last rank's first chunk: both copies on one rank, summed locally
        "pp2_vpp2_both_copies_on_rank1": (_steps(pp=2, vpp=2, vit_pp_layers=[[2, 0], [0, 0]],
                                                 llm_pp_layers=[[0, 1], [1, 1]]), (1,)),
    },
    4: {
        # the LLM's embedding off rank 0's first chunk, where megatron alone would give it no bucket of its own
        "dp2_pp2_vpp2_distributed_optimizer": (_steps(dp=2, pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]],
                                                      llm_pp_layers=[[0, 0], [1, 2]], distributed_optimizer=True),
                                               (0, 1)),
        # the ViT alone on the first two ranks: the embedding group is ranks 2 and 3 of the pipeline
        "pp4_llm_from_rank2": (_steps(pp=4, vit_pp_layers=[[1, 1, 0, 0]], llm_pp_layers=[[0, 0, 1, 2]]), (2, 3)),
    },
}


def tied_copies(results: list[dict], plan) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(tp_rank, dp_rank): (the LLM's first stage's embeddings, the last stage's output-layer copy)}."""
    first = next(s.stage for s in plan.stages if s.has_llm_embed)
    last = plan.stages[-1].stage
    held: dict = {}
    for r in results:
        key = (r["tp_rank"], r["dp_rank"])
        for stage, tensors in r["tensors"].items():
            if stage == first:
                held.setdefault(key, {})["embed"] = tensors[EMBEDDING]
            if stage == last:
                held.setdefault(key, {})["output"] = tensors[OUTPUT_LAYER]
    return {k: (v["embed"], v["output"]) for k, v in held.items()}


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("nproc", list(LAUNCHES))
def test_tied_embeddings_over_stages_match_single_rank(nproc, hf_dirs, reference, tmp_path):
    names, layouts = list(LAUNCHES[nproc]), [a for a, _ in LAUNCHES[nproc].values()]
    results = run_many(hf_dirs, tmp_path, PRESET, nproc, layouts)
    for name, args, got in zip(names, layouts, results):
        print(f"--- {name}")
        spec, plan = layout_plan(hf_dirs[PRESET], args, nproc)
        assert plan.tied_embedding_pp_ranks == LAUNCHES[nproc][name][1], name
        assert_losses(got, reference, dp=nproc // (args.pp * args.tp))
        copies = tied_copies(load_rank_results(tmp_path / str(names.index(name))), plan)
        assert len(copies) == nproc // (args.pp * args.tp), copies.keys()
        for key, (embed, output) in copies.items():
            assert torch.equal(embed, output), f"{name} (tp, dp) {key}: the copies differ by " \
                                               f"{(embed - output).abs().max().item():.3g}"
        assert_close(got["tensors"], reference["tensors"], PARAM_TOL, f"param ({name})", relative=False)


def test_tied_embedding_pp_ranks(hf_dirs):
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.parallel.layout import plan_layout
    from tests.helpers.layout_check import trainable_spec

    tied = trainable_spec(hf_dirs[PRESET])
    untied = dataclasses.replace(tied, text=dataclasses.replace(tied.text, untie_embeddings_and_output_weights=True))

    def ranks(spec, pp, vpp, vit, llm):
        return plan_layout(spec, ParallelSizes(pp=pp, vpp=vpp), pp, vit, llm).tied_embedding_pp_ranks

    assert ranks(tied, 2, 1, [[2, 0]], [[1, 2]]) == (0, 1)
    assert ranks(tied, 2, 1, [[2, 0]], [[0, 3]]) == ()  # the LLM on one stage: one tensor
    assert ranks(tied, 2, 2, [[2, 0], [0, 0]], [[0, 1], [1, 1]]) == (1,)
    assert ranks(tied, 4, 1, [[1, 1, 0, 0]], [[0, 0, 1, 2]]) == (2, 3)
    assert ranks(untied, 2, 1, [[2, 0]], [[1, 2]]) == ()
