"""The three command-line tools on bad input: status 2 and one last line `<prog>: error: ...` naming the field
or file, no traceback unless `--debug` or MM_DEBUG=1; mm-convert prints its summary once.

Each case is a fresh interpreter; most fail before torch is imported (~0.3 s), a few after (~2-3 s), one after
a model is built (the fatal data case)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.errors import UserError, one_line, run_main

REPO = Path(__file__).resolve().parents[2]
CONVERT = ["-m", "mindspeed_mm.cli.mm_convert", "InternVLConverter"]
PRETRAIN = [str(REPO / "pretrain_vlm.py")]
INFER = [str(REPO / "inference_vlm.py")]
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MM_DEBUG")


def run(args, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **({"MM_DEBUG": "1"} if debug_env else {}))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, prog: str, names: tuple[str, ...]) -> None:
    err = proc.stderr
    assert proc.returncode == 2, f"status {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err + proc.stdout, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith(f"{prog}: error:")] == lines[-1:], err[-3000:]
    for name in names:
        assert name in lines[-1], (name, lines[-1])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny HF checkpoint and its MM conversions (TP1, TP2 x PP2), broken copies, a model and data JSON for
    training, an inference JSON, and a few malformed files."""
    from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
    from mindspeed_mm.testing.tiny_run import write_data_json, write_model_json

    root = tmp_path_factory.mktemp("cli_errors")
    hf = write_tiny_checkpoint(root / "hf", "native", "tp4", seed=1)
    spec = spec_from_hf_dir(hf)
    for name, tp, vit, llm in (("mm", 1, None, None), ("mm_tp2pp2", 2, [[2, 0]], [[1, 1]])):
        hf_to_mm(HFToMMConfig(mm_dir=str(root / name), hf_config=HFConfig(str(hf)), progress=False,
                              parallel_config=ParallelConfig(tp_size=tp, vit_pp_layers=vit, llm_pp_layers=llm)))
    shutil.copytree(hf, root / "hf_truncated")
    st = root / "hf_truncated" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    shutil.copytree(root / "mm", root / "mm_truncated")
    pt = root / "mm_truncated" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    shutil.copytree(root / "mm", root / "mm_bad_meta")
    (root / "mm_bad_meta" / "mm_convert_meta.json").write_text('{"tp": 1,')
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")

    model = write_model_json(hf, root / "model.json")
    write_model_json(hf, root / "model_pp.json", llm_pp_layers=[[1, 1]])
    (root / "bad.json").write_text('{"text_decoder": {\n')
    raw = json.loads(model.read_text())
    raw["text_decoder"]["num_layerz"] = 2
    (root / "model_unknown_key.json").write_text(json.dumps(raw))
    text = root / "text.jsonl"
    text.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                  {"from": "gpt", "value": "Hello"}]}) + "\n")
    images = root / "images.jsonl"  # every image missing: no sample is usable
    images.write_text("".join(json.dumps({"image": f"img_{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Blue."}]}) + "\n" for i in range(3)))
    size = spec.vision.image_size
    write_data_json(root / "data.json", text, hf, size)
    write_data_json(root / "data_images.json", images, hf, size)
    write_data_json(root / "data_no_file.json", root / "absent.jsonl", hf, size)
    write_data_json(root / "data_no_tokenizer.json", text, root / "no_tokenizer", size)
    raw = json.loads((root / "data.json").read_text())
    raw["dataloader_param"]["shuffle"] = "yes"
    (root / "data_ill_typed.json").write_text(json.dumps(raw))

    from PIL import Image

    Image.new("RGB", (56, 56), (0, 0, 255)).save(root / "blue.png")
    (root / "requests.jsonl").write_text('{"prompt": "Hi",\n')
    infer = {"infer_data_type": "image", "file_path": str(root / "blue.png"), "prompts": ["What?"],
             "from_pretrained": str(root / "mm"), "tokenizer": {"from_pretrained": str(hf)}, "dtype": "fp32",
             "device": "cpu", "generation_config": {"max_new_tokens": 2}}
    (root / "infer.json").write_text(json.dumps(infer))
    return root


def infer_json(root: Path, name: str, drop: tuple[str, ...] = (), **changes) -> Path:
    raw = {k: v for k, v in json.loads((root / "infer.json").read_text()).items() if k not in drop}
    path = root / f"infer_{name}.json"
    path.write_text(json.dumps({**raw, **{k: str(root / v) if k in ("from_pretrained", "file_path",
                                                                      "requests_file") else v
                                          for k, v in changes.items()}}))
    return path


# ------------------------------------------------------------------------------------------------ mm-convert
def _hf_to_mm(r: Path, *extra, hf: str = "hf", out: str = "out") -> list:
    return ["hf_to_mm", "--cfg.mm_dir", r / out, "--cfg.hf_config.hf_dir", r / hf, "--cfg.progress", "false", *extra]


_LLM, _VIT = "--cfg.parallel_config.llm_pp_layers", "--cfg.parallel_config.vit_pp_layers"
CONVERT_CASES = {  # name: (argv(root), what the error line must name)
    "stage_counts_disagree": (lambda r: _hf_to_mm(r, _LLM, "[[1,1]]", _VIT, "[[3]]"),
                              ("vit_pp_layers [[3]] has 1 entries", "llm_pp_layers [[1,1]]", "same [vpp][pp]")),
    "ragged_lists": (lambda r: _hf_to_mm(r, _LLM, "[[1,1],[1]]"), ("parallel_config.llm_pp_layers", "[[1,1],[1]]")),
    "layer_sum": (lambda r: _hf_to_mm(r, _LLM, "[[1,2]]", _VIT, "[[2,0]]"), ("llm_pp_layers", "sums to 3")),
    "tp_size_vs_heads": (lambda r: _hf_to_mm(r, "--cfg.parallel_config.tp_size", "3"),
                         ("parallel_config.tp_size=3", "num_query_groups")),
    "ill_typed_value": (lambda r: _hf_to_mm(r, "--cfg.parallel_config.tp_size", "two"),
                        ("--cfg.parallel_config.tp_size", "expected int")),
    "malformed_list": (lambda r: _hf_to_mm(r, _LLM, "[[1,1]"), ("--cfg.parallel_config.llm_pp_layers", "[[1,1]")),
    "unknown_option": (lambda r: _hf_to_mm(r, "--cfg.bogus", "1"), ("--cfg.bogus",)),
    "missing_required": (lambda r: ["hf_to_mm", "--cfg.hf_config.hf_dir", r / "hf"], ("--cfg.mm_dir",)),
    "unknown_command": (lambda r: ["hf2mm"], ("hf2mm", "hf_to_mm")),
    "missing_config_file": (lambda r: ["hf_to_mm", "--config", r / "nofile.yaml"], ("--config", "nofile.yaml")),
    "missing_hf_dir": (lambda r: _hf_to_mm(r, hf="no_hf"), ("no_hf",)),
    "no_hf_dir_given": (lambda r: ["hf_to_mm", "--cfg.mm_dir", r / "out"], ("hf_config.hf_dir",)),
    "output_not_empty": (lambda r: _hf_to_mm(r, out="full"), ("full", "overwrite")),
    "truncated_safetensors": (lambda r: _hf_to_mm(r, hf="hf_truncated"), ("model.safetensors", "truncated")),
    "bad_workers": (lambda r: _hf_to_mm(r, "--cfg.workers", "-1"), ("workers",)),
    "missing_meta": (lambda r: ["mm_to_hf", "--cfg.mm_dir", r / "hf", "--cfg.save_hf_dir", r / "back"],
                     ("mm_convert_meta.json", "--cfg.hf_config.hf_dir")),
    "bad_shard_size": (lambda r: ["mm_to_hf", "--cfg.mm_dir", r / "mm", "--cfg.save_hf_dir", r / "back",
                                  "--cfg.max_shard_size", "5QB"], ("max_shard_size", "5QB")),
    "missing_mm_dir": (lambda r: ["resplit", "--cfg.mm_dir", r / "no_mm", "--cfg.save_mm_dir", r / "out"],
                       ("mm_dir", "no_mm")),
    "truncated_rank_file": (lambda r: ["resplit", "--cfg.mm_dir", r / "mm_truncated", "--cfg.save_mm_dir", r / "out",
                                       "--cfg.progress", "false"], ("mp_rank_00/model_optim_rng.pt",)),
}


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_mm_convert_bad_input(inputs, case):
    argv, names = CONVERT_CASES[case]
    assert_user_error(run([*CONVERT, *argv(inputs)]), "mm-convert", names)
    assert not (inputs / "out").exists()


def test_mm_convert_prints_its_summary_once(inputs, tmp_path):
    proc = run([*CONVERT, "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", inputs / "hf",
                "--cfg.parallel_config.tp_size", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = (proc.stdout + proc.stderr).splitlines()
    assert len([line for line in out if "hf_to_mm: native HF -> MM TP2 PP1" in line]) == 1, out


# ------------------------------------------------------------------------------------------------ pretrain_vlm.py
def _train(r: Path, *extra, model: str = "model.json", data: str = "data.json") -> list:
    return [*PRETRAIN, "--mm-model", r / model, "--mm-data", r / data, "--train-iters", "1", "--num-workers", "0",
            "--seq-length", "256", *extra]


PRETRAIN_CASES = {
    "unknown_flag": (lambda r: _train(r, "--no-such-flag"), ("--no-such-flag",)),
    "ill_typed_flag": (lambda r: _train(r, "--train-iters", "abc"), ("--train-iters", "abc")),
    "bad_flag_value": (lambda r: _train(r, "--train-iters", "0"), ("--train-iters",)),
    "missing_specs": (lambda r: [*PRETRAIN, "--train-iters", "1"], ("--mm-model",)),
    "exclusive_flags": (lambda r: _train(r, "--bf16", "--fp16"), ("--bf16", "--fp16")),
    "missing_model_json": (lambda r: _train(r, model="absent.json"), ("absent.json",)),
    "malformed_model_json": (lambda r: _train(r, model="bad.json"), ("bad.json", "line 2")),
    "unknown_model_key": (lambda r: _train(r, model="model_unknown_key.json"), ("text_decoder.num_layerz",)),
    "stage_lists_vs_pp": (lambda r: _train(r, model="model_pp.json"), ("text_decoder.pipeline_num_layers", "pp=1")),
    "tp_vs_heads": (lambda r: _train(r, "--tensor-model-parallel-size", "3"), ("tensor_model_parallel_size=3",)),
    "vpp_without_pp": (lambda r: _train(r, "--virtual-pipeline-model-parallel-size", "2"),
                       ("--virtual-pipeline-model-parallel-size", "needs pp > 1")),
    "flag_contradicts_json": (lambda r: _train(r, "--vocab-size", "7"), ("--vocab-size", "text_decoder.vocab_size")),
    "ill_typed_data_json": (lambda r: _train(r, data="data_ill_typed.json"), ("dataloader_param.shuffle",)),
    "missing_annotations": (lambda r: _train(r, data="data_no_file.json"), ("data_path", "absent.jsonl")),
    "missing_tokenizer": (lambda r: _train(r, data="data_no_tokenizer.json"),
                          ("tokenizer_config.from_pretrained", "no_tokenizer")),
    "missing_load_dir": (lambda r: _train(r, "--load", r / "no_ckpt"), ("--load", "no_ckpt")),
    "world_size": (lambda r: _train(r, "--tensor-model-parallel-size", "2"),  # checked once torch is there
                   ("--tensor-model-parallel-size", "world size 1")),
}


@pytest.mark.parametrize("case", PRETRAIN_CASES)
def test_pretrain_bad_input(inputs, case):
    argv, names = PRETRAIN_CASES[case]
    assert_user_error(run(argv(inputs)), "pretrain_vlm.py", names)


@pytest.mark.slow
def test_pretrain_unusable_data_stops_in_a_loader_worker(inputs):
    """Every image missing: the data loader's worker gives up, its traceback does not reach the user."""
    proc = run(_train(inputs, "--num-workers", "1", data="data_images.json"))
    assert_user_error(proc, "pretrain_vlm.py", ("unusable", "img_2.png", "data_folder"))


# ------------------------------------------------------------------------------------------------ inference_vlm.py
INFER_CASES = {
    "malformed_json": (lambda r: [r / "bad.json"], ("bad.json", "line 2")),
    "missing_json": (lambda r: [r / "absent.json"], ("absent.json",)),
    "unknown_key": (lambda r: [infer_json(r, "unknown", bogus=1)], ("bogus",)),
    "ill_typed_field": (lambda r: [infer_json(r, "typed", batch_size="two")], ("batch_size", "two")),
    "bad_choice": (lambda r: [infer_json(r, "dtype", dtype="int8")], ("dtype", "int8")),
    "bad_generation_value": (lambda r: [infer_json(r, "top_p", generation_config={"top_p": 0})],
                             ("generation_config.top_p",)),
    "missing_required_key": (lambda r: [infer_json(r, "no_tok", drop=("tokenizer",))], ("tokenizer",)),
    "missing_image": (lambda r: [infer_json(r, "no_image", file_path="absent.png")], ("file_path", "absent.png")),
    "malformed_requests_file": (lambda r: [infer_json(r, "reqs", requests_file="requests.jsonl")],
                                ("requests_file line 1",)),
    "config_given_twice": (lambda r: [r / "infer.json", "--mm-model", r / "infer.json"], ("--mm-model",)),
    "unknown_flag": (lambda r: [r / "infer.json", "--bogus"], ("--bogus",)),
    "ill_typed_flag": (lambda r: [r / "infer.json", "--seed", "abc"], ("--seed", "abc")),
    "missing_checkpoint": (lambda r: [infer_json(r, "no_ckpt", from_pretrained="absent_ckpt")],
                           ("from_pretrained", "absent_ckpt")),
    "hf_dir_as_checkpoint": (lambda r: [infer_json(r, "hf_ckpt", from_pretrained="hf")], ("from_pretrained", "hf_to_mm")),
    "bad_meta": (lambda r: [infer_json(r, "bad_meta", from_pretrained="mm_bad_meta")], ("mm_convert_meta.json",)),
    "layout_needs_more_processes": (lambda r: [infer_json(r, "tp2pp2", from_pretrained="mm_tp2pp2")],
                                    ("TP2 x PP2", "--nproc_per_node 4")),
}


@pytest.mark.parametrize("case", INFER_CASES)
def test_inference_bad_input(inputs, case):
    argv, names = INFER_CASES[case]
    assert_user_error(run([*INFER, *argv(inputs)]), "inference_vlm.py", names)


def test_inference_cuda_without_cuda_runs_on_cpu(inputs):
    """As the reference's "npu": the device that is there runs, with a one-line note."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run([*INFER, infer_json(inputs, "cuda", device="cuda")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("device 'cuda' asked for; running on cpu") == 1


# ------------------------------------------------------------------------------------------------ --debug
@pytest.mark.parametrize("argv,debug_env", [
    (lambda r: [*CONVERT, *_hf_to_mm(r, _LLM, "[[1,1]]", _VIT, "[[3]]"), "--debug"], False),
    (lambda r: _train(r, "--train-iters", "0"), True),
    (lambda r: [*INFER, infer_json(r, "debug", dtype="int8"), "--debug"], False),
], ids=["mm-convert --debug", "pretrain MM_DEBUG=1", "inference --debug"])
def test_debug_shows_the_traceback(inputs, argv, debug_env):
    proc = run(argv(inputs), debug_env=debug_env)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert "Error: " in proc.stderr.splitlines()[-1]


# ------------------------------------------------------------------------------------------------ the runner
def test_runner_one_line_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("MM_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def fails(exc):
        def main(argv):
            assert "--debug" not in argv
            raise exc
        return main

    assert run_main("prog", fails(UserError("a.b: bad\n  value\n")), ["x"]) == 2
    assert capsys.readouterr().err == "prog: error: a.b: bad value\n"
    assert run_main("prog", fails(FileNotFoundError("no such file: f.json")), []) == 2
    assert capsys.readouterr().err == "prog: error: no such file: f.json\n"
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_main("prog", fails(RuntimeError("bug")), [])
    with pytest.raises(UserError):
        run_main("prog", fails(UserError("x")), ["--debug"])
    monkeypatch.setenv("RANK", "3")
    assert run_main("prog", fails(UserError("x")), []) == 2
    assert capsys.readouterr().err == "prog: error: (rank 3) x\n"
    # torch's DataLoader puts a worker's traceback into the message of the error it re-raises
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nmindspeed_mm.errors.UserError: 3 samples unusable")
    assert one_line(wrapped) == "3 samples unusable"


def test_literal_image_token_in_the_text_is_a_user_error():
    """Written into a prompt or a record, <IMG_CONTEXT> would be an image slot with no image behind it, found
    only in the model's forward (ImageTokenMismatch, kept for bugs); the template refuses it first."""
    from mindspeed_mm.data.template import build_prompt

    with pytest.raises(UserError, match="turn 0: the text holds <IMG_CONTEXT>"):
        build_prompt([{"from": "human", "value": "What is <IMG_CONTEXT>?"}], [], 256, tokenizer=None)
