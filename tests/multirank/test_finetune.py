"""`pretrain_vlm.py` end to end under torchrun: the first loss against transformers, every layout against one
rank, the loss modes, resuming (same and other layout), a save killed half-way, and bad samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import run_torchrun
from tests.helpers.torch_files import saved_tensors
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "pretrain_vlm.py"
KILL_WORKER = Path(__file__).parent / "workers" / "killed_save.py"
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("finetune"), preset="deep", seed=3)


def model_json(tiny, tmp_path: Path, name: str, vit=None, llm=None) -> Path:
    return write_model_json(tiny.hf_dir, tmp_path / f"model_{name}.json", vit, llm)


def records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in records(metrics)]


def train(tiny, tmp_path: Path, name: str, nproc: int, model: Path, iters: int, extra=(), **kw) -> Path:
    metrics = tmp_path / f"{name}.jsonl"
    run_torchrun(PRETRAIN, nproc, pretrain_args(tiny, model, iters=iters, metrics=metrics, extra=tuple(extra), **kw),
                 timeout=600)
    return metrics




# ------------------------------------------------------------------------------------------------------------

def test_first_loss_equals_transformers(tiny, tmp_path):
    """The loop's first loss (its own data pipeline, converted weights) is transformers' loss on that batch."""
    from transformers import AutoTokenizer

    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import load_data_spec
    from tests.helpers.oracle import load_native_model
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.data import build_train_iterator

    model = model_json(tiny, tmp_path, "tp1")
    argv = pretrain_args(tiny, model, iters=1, mbs=2, gbs=2, load=tiny.mm_dir)
    metrics = train(tiny, tmp_path, "first", 1, model, 1, mbs=2, gbs=2, load=tiny.mm_dir)
    got = losses(metrics)[0]

    args = parse_args(argv)
    data_spec = load_data_spec(args.mm_data)
    tokenizer = AutoTokenizer.from_pretrained(tiny.hf_dir)
    batch = next(build_train_iterator(data_spec, tokenizer, load_model_spec(model), args, 0, 1, 0))
    assert batch["pixel_values"] is not None and batch["pixel_values"].shape[0] > 1
    hf = load_native_model(tiny.hf_dir).float().eval()
    with torch.no_grad():
        want = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                  attention_mask=batch["attention_mask"].long(), labels=batch["labels"]).loss.item()
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)


LAYOUTS = {
    # name: (ranks, vit per stage, llm per stage, extra flags)
    "tp2_unaligned": (2, None, None, ["--tensor-model-parallel-size", "2"]),
    "tp2_sp": (2, None, None, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, [[4, 0]], [[1, 3]], ["--pipeline-model-parallel-size", "2"]),
    "pp2_vpp2": (2, [[2, 2], [0, 0]], [[0, 0], [2, 2]],
                 ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]),
    "cp2_ring": (2, None, None, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"]),
    "cp2_ulysses": (2, None, None, ["--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo"]),
    "dp2_distopt": (2, None, None, ["--use-distributed-optimizer"]),
    "tp2_pp2_recompute": (4, [[4, 0]], [[1, 3]], ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                                  "2", "--recompute-granularity", "full", "--recompute-method",
                                                  "uniform", "--recompute-num-layers", "1"]),
}


@pytest.fixture(scope="module")
def single_rank_run(tiny, tmp_path_factory):
    """(records, stdout) of 3 iterations on one rank, with `--log-tps` as the reference scripts run."""
    tmp = tmp_path_factory.mktemp("single")
    metrics = tmp / "single.jsonl"
    out = run_torchrun(PRETRAIN, 1, pretrain_args(tiny, model_json(tiny, tmp, "single"), iters=3, metrics=metrics,
                                                  load=tiny.mm_dir, extra=("--log-tps",)), timeout=600)
    return records(metrics), out.stdout


@pytest.fixture(scope="module")
def single_rank_losses(single_rank_run):
    return [r["loss"] for r in single_rank_run[0]]


def test_reference_throughput_summary_reads_the_log(single_rank_run, tmp_path):
    """The reference scripts' summary, verbatim, over a real run's log prints the records' figures."""
    from tests.helpers.throughput_summary import check_against_records, expected, summary

    rec, stdout = single_rank_run
    gbs = rec[0]["global_batch_size"]
    assert gbs == 4 and all(r["tokens_per_sample"] > 0 for r in rec)
    got = summary(stdout, gbs, tmp_path)
    assert got == expected(rec, gbs)
    check_against_records(got, rec, gbs)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_first_three_losses_agree_across_layouts(tiny, tmp_path, single_rank_losses, layout):
    ranks, vit, llm, extra = LAYOUTS[layout]
    got = losses(train(tiny, tmp_path, layout, ranks, model_json(tiny, tmp_path, layout, vit, llm), 3,
                       load=tiny.mm_dir, extra=extra))
    assert len(got) == 3
    for g, w in zip(got, single_rank_losses):
        assert abs(g - w) <= LOSS_RTOL * abs(w), (layout, got, single_rank_losses)


def test_loads_a_checkpoint_without_our_metadata(tiny, tmp_path):
    """The reference system's converter writes the same layout without mm_convert_meta.json: it loads at the
    run's layout and trains to the same loss as our own conversion."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny.mm_dir, foreign)
    (foreign / "mm_convert_meta.json").unlink()
    model = model_json(tiny, tmp_path, "foreign")
    ours = losses(train(tiny, tmp_path, "ours", 1, model, 1, load=tiny.mm_dir))
    theirs = losses(train(tiny, tmp_path, "theirs", 1, model, 1, load=foreign))
    assert ours == theirs


def test_frozen_vit_stays_unchanged(tiny, tmp_path):
    model = write_model_json(tiny.hf_dir, tmp_path / "frozen.json", freeze_vit=True)
    train(tiny, tmp_path, "frozen", 1, model, 2, load=tiny.mm_dir, save=tmp_path / "frozen")
    before = _merged_weights(tiny.mm_dir)
    after = _merged_weights(tmp_path / "frozen")
    vit = [k for k in before if k.startswith("image_encoder.encoder.")]
    llm = [k for k in before if k.startswith("text_decoder.")]
    assert vit and all(torch.equal(before[k], after[k]) for k in vit)
    assert any(not torch.equal(before[k], after[k]) for k in llm)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_trains_and_resumes(tiny, tmp_path, dtype):
    """bf16 / fp16 parameters (fp16 with dynamic loss scaling) with fp32 main weights: the loss falls, and a
    resume reproduces the uninterrupted run exactly."""
    model = write_model_json(tiny.hf_dir, tmp_path / f"{dtype}.json", params_dtype=dtype)
    raw = json.loads(model.read_text())
    raw["image_encoder"]["vision_encoder"]["params_dtype"] = dtype
    model.write_text(json.dumps(raw))
    flags = [f"--{dtype}", "--initial-loss-scale", "1024"]
    full = records(train(tiny, tmp_path, "full", 1, model, 6, load=tiny.mm_dir, lr=2e-3, extra=flags))
    first = records(train(tiny, tmp_path, "a", 1, model, 6, load=tiny.mm_dir, lr=2e-3, save=tmp_path / "ck",
                          extra=[*flags, "--exit-interval", "3"]))
    second = records(train(tiny, tmp_path, "b", 1, model, 6, load=tmp_path / "ck", lr=2e-3, extra=flags))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert full[-1]["loss"] < full[0]["loss"]


def test_per_token_loss_independent_of_microbatch_split(tiny, tmp_path):
    """Same global batch of 4 as 4x1, 2x2 and 1x4 micro-batches, and over DP2: same losses and updates."""
    model = model_json(tiny, tmp_path, "pt")
    runs = {}
    for name, mbs, ranks in (("mbs1", 1, 1), ("mbs2", 2, 1), ("mbs4", 4, 1), ("dp2", 1, 2)):
        runs[name] = records(train(tiny, tmp_path, name, ranks, model, 2, mbs=mbs, gbs=4, load=tiny.mm_dir,
                                   extra=["--calculate-per-token-loss"]))
    base = runs.pop("mbs1")
    for name, rec in runs.items():
        for r, b in zip(rec, base):
            assert abs(r["loss"] - b["loss"]) <= LOSS_RTOL * abs(b["loss"]), (name, r["loss"], b["loss"])
            assert abs(r["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (name, r, b)
    # the default mode is a mean of micro-batch means: it does depend on the split, so the test can tell
    default = [losses(train(tiny, tmp_path, f"default{mbs}", 1, model, 1, mbs=mbs, gbs=4, load=tiny.mm_dir))[0]
               for mbs in (1, 4)]
    assert abs(default[0] - default[1]) > 1e-4 * abs(default[1])


def test_per_sample_loss_runs_and_differs_from_default(tiny, tmp_path):
    model = model_json(tiny, tmp_path, "ps")
    per_sample = losses(train(tiny, tmp_path, "ps", 1, model, 1, mbs=4, gbs=4, load=tiny.mm_dir,
                              extra=["--calculate-per-sample-loss"]))[0]
    default = losses(train(tiny, tmp_path, "def", 1, model, 1, mbs=4, gbs=4, load=tiny.mm_dir))[0]
    assert per_sample > 0 and abs(per_sample - default) > 1e-4 * default


def test_resume_is_bit_exact_at_the_same_layout(tiny, tmp_path):
    model = model_json(tiny, tmp_path, "resume")
    full = records(train(tiny, tmp_path, "full", 1, model, 4, load=tiny.mm_dir, save=tmp_path / "full"))
    first = records(train(tiny, tmp_path, "first", 1, model, 4, load=tiny.mm_dir, save=tmp_path / "half",
                          extra=["--exit-interval", "2"]))
    assert (tmp_path / "half" / "latest_checkpointed_iteration.txt").read_text() == "2"
    second = records(train(tiny, tmp_path, "second", 1, model, 4, load=tmp_path / "half", save=tmp_path / "half"))
    assert [r["iteration"] for r in first + second] == [1, 2, 3, 4]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert [r["lr"] for r in first + second] == [r["lr"] for r in full]
    a, b = saved_tensors(tmp_path / "full", 4), saved_tensors(tmp_path / "half", 4)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_resume_at_another_layout(tiny, tmp_path):
    """Saved at TP2 (DP1, distributed optimizer), resumed at PP2 x DP1 and at DP2: losses and final weights
    match the uninterrupted single-rank run within 1e-5."""
    tp2 = model_json(tiny, tmp_path, "tp2")
    single = model_json(tiny, tmp_path, "one")
    pp2 = model_json(tiny, tmp_path, "pp2", [[4, 0]], [[1, 3]])
    full = records(train(tiny, tmp_path, "full", 1, single, 4, load=tiny.mm_dir, save=tmp_path / "full"))
    train(tiny, tmp_path, "a", 2, tp2, 4, load=tiny.mm_dir, save=tmp_path / "a",
          extra=["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--exit-interval", "2"])
    for name, ranks, model, extra in (("pp2", 2, pp2, ["--pipeline-model-parallel-size", "2"]),
                                      ("dp2", 2, single, ["--use-distributed-optimizer"])):
        rec = records(train(tiny, tmp_path, f"b_{name}", ranks, model, 4, load=tmp_path / "a",
                            save=tmp_path / f"b_{name}", extra=extra))
        assert [r["iteration"] for r in rec] == [3, 4]
        for r, w in zip(rec, full[2:]):
            assert abs(r["loss"] - w["loss"]) <= LOSS_RTOL * abs(w["loss"]), (name, r["loss"], w["loss"])
        merged = _merged_weights(tmp_path / f"b_{name}")
        want = _merged_weights(tmp_path / "full")
        worst = max((merged[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1e-6) for k in want)
        assert worst <= 1e-5, (name, worst)
    # mm-convert reads a training save like a conversion: back to HF, bit-exact to the saved weights
    _assert_mm_to_hf_exact(tmp_path / "b_pp2", tmp_path / "hf_out")


def _assert_mm_to_hf_exact(save_dir: Path, out: Path) -> None:
    from mindspeed_mm.cli.mm_convert import MMToHFConfig, mm_to_hf
    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from tests.helpers.oracle import load_native_model

    mm_to_hf(MMToHFConfig(mm_dir=str(save_dir), save_hf_dir=str(out), progress=False))
    config, fmt, state = load_hf_checkpoint(out)
    back = hf_to_mm(state, spec_from_hf_config(config), fmt)
    saved = _merged_weights(save_dir)
    assert back.keys() == saved.keys()
    assert all(torch.equal(back[k], saved[k]) for k in saved)
    load_native_model(out)  # transformers loads it


def _merged_weights(save_dir: Path) -> dict:
    """Full-model weights of a save at any layout, through the converter's reader."""
    from mindspeed_mm.checkpoint.sources import MMSource
    from mindspeed_mm.checkpoint.mm_format import checkpoint_meta

    meta = checkpoint_meta(save_dir)
    spec = meta.spec()
    src = MMSource(save_dir, meta, spec, meta.plan(spec))
    return {name: src.tensor(name).clone() for name in src.where}


def test_killed_save_leaves_the_previous_checkpoint(tiny, tmp_path):
    model = model_json(tiny, tmp_path, "kill")
    save = tmp_path / "ckpt"
    args = pretrain_args(tiny, model, iters=3, load=tiny.mm_dir, save=save, extra=("--save-interval", "1"))
    with pytest.raises(AssertionError, match="exited with"):
        run_torchrun(KILL_WORKER, 2, ["--tensor-model-parallel-size", "2", *args], timeout=600)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (save / "iter_0000002").exists() and (save / ".iter_0000002.tmp").exists()
    rec = records(train(tiny, tmp_path, "after", 2, model, 3, load=save, save=save,
                        extra=["--tensor-model-parallel-size", "2"]))
    assert [r["iteration"] for r in rec] == [2, 3]
    assert not (save / ".iter_0000002.tmp").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    # --finetune takes only the weights: iterations, schedule and data restart
    rec = records(train(tiny, tmp_path, "ft", 1, model, 1, load=save, extra=["--finetune"]))
    assert [r["iteration"] for r in rec] == [1] and rec[0]["consumed_samples"] == 4
    # --no-load-optim keeps the position but starts the optimizer afresh, at the LR where the run left off
    rec = records(train(tiny, tmp_path, "noopt", 1, model, 4, load=save, extra=["--no-load-optim", "--no-load-rng"]))
    assert [r["iteration"] for r in rec] == [4] and rec[0]["consumed_samples"] == 16


def test_bad_samples_are_skipped_and_counted(tmp_path):
    """One epoch over a dataset with every kind of broken record: training never stops, every broken record is
    skipped (replaced by the next good one) and counted under its reason."""
    from mindspeed_mm.testing.tiny_dataset import BROKEN_LOADED, BROKEN_REASONS

    run = prepare_tiny_run(tmp_path / "broken", preset="vit300m", seed=5, broken=True)
    n_records = len(run.data_jsonl.read_text().splitlines())
    raw = json.loads(run.data_json.read_text())
    raw["dataloader_param"]["drop_last"] = False  # the epoch is every record, whatever the permutation
    run.data_json.write_text(json.dumps(raw))
    model = write_model_json(run.hf_dir, tmp_path / "model.json")
    metrics = tmp_path / "m.jsonl"
    iters = -(-n_records // 4)
    run_torchrun(PRETRAIN, 1, pretrain_args(run, model, iters=iters, mbs=4, gbs=4, load=run.mm_dir,
                                            metrics=metrics), timeout=600)
    rec = records(metrics)
    assert len(rec) == iters and all(r["loss"] == r["loss"] for r in rec)
    by_reason = rec[-1]["skipped_by_reason"]
    for reason, n in BROKEN_REASONS.items():
        assert by_reason.get(reason, 0) >= n, (reason, by_reason)
    assert rec[-1]["skipped_samples"] == sum(by_reason.values())
    for note, n in BROKEN_LOADED.items():  # a truncated image is trained on (as InternVL does) and counted
        assert rec[-1]["loaded_by_note"].get(note, 0) >= n, rec[-1]["loaded_by_note"]
