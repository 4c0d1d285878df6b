"""Dynamic tiling / pixel values (against transformers' GotOcr2ImageProcessorPil, bit for bit, on real photos
from scikit-image's wheel), the internvl2_5 template and its label masking, and load_image errors."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_mm.data.template import IGNORE_INDEX, build_conversation
from mindspeed_mm.data.tiling import IMAGENET_MEAN, IMAGENET_STD, choose_grid, dynamic_tiles, load_image, to_pixel_values
from mindspeed_mm.data.template import DEFAULT_SYSTEM_MESSAGE
from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
from tests.helpers.template_oracle import expected_conversation

# ------------------------------------------------------------------------------------------------------------
# Tiling and pixels
# ------------------------------------------------------------------------------------------------------------

_SKIMAGE_PHOTOS = [
    "astronaut.png",  # 512x512 RGB
    "chelsea.png",  # 451x300
    "coffee.png",  # 600x400
    "rocket.jpg",  # 640x427
    "cell.png",  # 550x660 grayscale, portrait
    "motorcycle_left.png",  # 741x500
    "hubble_deep_field.jpg",  # 1000x872
    "text.png",  # 448x172 grayscale, wide
    "horse.png",  # RGBA
]


def _skimage_data_dir():
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image not installed (pip install -e .[test])")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _synthetic(width, height, seed=0):
    rng = np.random.default_rng(seed)
    # smooth gradient + noise, so resampling differences would show
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


_SYNTHETIC_SIZES = [(1, 1), (7, 5), (3000, 40), (40, 3000), (896, 448), (1344, 448), (449, 1500)]


@pytest.fixture(scope="module")
def oracle_cache():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.image_utils import PILImageResampling

    procs = {}

    def get(max_tiles):
        if max_tiles not in procs:
            procs[max_tiles] = GotOcr2ImageProcessorPil(
                crop_to_patches=True,
                min_patches=1,
                max_patches=max_tiles,
                size={"height": 448, "width": 448},
                image_mean=list(IMAGENET_MEAN),
                image_std=list(IMAGENET_STD),
                resample=PILImageResampling.BICUBIC,
                do_resize=True,
                do_rescale=True,
                rescale_factor=1 / 255,
                do_normalize=True,
                do_convert_rgb=True,
            )
        return procs[max_tiles]

    return get


def _check_against_oracle(image, max_tiles, oracle_cache):
    tiles = dynamic_tiles(image, image_size=448, min_tiles=1, max_tiles=max_tiles, use_thumbnail=True)
    ours = to_pixel_values(tiles)
    out = oracle_cache(max_tiles)(images=[image], return_tensors="pt")
    ref = out["pixel_values"]
    assert int(out["num_patches"][0]) == len(tiles)
    assert ours.dtype == torch.float32 and ours.shape == (len(tiles), 3, 448, 448)
    assert ref.dtype == torch.float32 and ref.shape == ours.shape
    assert torch.equal(ours, ref), f"max |diff| {(ours - ref).abs().max().item()}"
    cols, rows = choose_grid(*image.size, 448, 1, max_tiles)
    assert len(tiles) == cols * rows + (cols * rows > 1)
    return tiles


@pytest.mark.parametrize("max_tiles", [12, 6])
@pytest.mark.parametrize("name", _SKIMAGE_PHOTOS)
def test_tiles_match_transformers_on_real_photos(name, max_tiles, oracle_cache):
    # load_image does InternVL's plain convert("RGB") (RGBA alpha dropped, as upstream); the oracle gets the
    # same RGB image so only tiling, resampling and normalisation are compared.
    image = load_image(os.path.join(_skimage_data_dir(), name))
    assert image.mode == "RGB"
    _check_against_oracle(image, max_tiles, oracle_cache)


@pytest.mark.parametrize("max_tiles", [12, 6])
@pytest.mark.parametrize("size", _SYNTHETIC_SIZES)
def test_tiles_match_transformers_on_synthetic_sizes(size, max_tiles, oracle_cache):
    _check_against_oracle(_synthetic(*size), max_tiles, oracle_cache)


def test_tile_layout_is_row_major_with_thumbnail():
    image = _synthetic(896, 448, seed=3)  # exactly 2x1
    assert choose_grid(896, 448) == (2, 1)
    tiles = dynamic_tiles(image)
    assert len(tiles) == 3 and all(t.size == (448, 448) for t in tiles)
    arr = np.asarray(image)
    assert np.array_equal(np.asarray(tiles[0]), arr[:, :448]) and np.array_equal(np.asarray(tiles[1]), arr[:, 448:])
    # one tile: no thumbnail; use_thumbnail=False: none either
    assert len(dynamic_tiles(_synthetic(448, 448))) == 1
    assert len(dynamic_tiles(image, use_thumbnail=False)) == 2
    # tie-break: a 2:1 image small in area keeps (2,1) rather than (4,2)
    assert choose_grid(200, 100) == (2, 1)
    assert choose_grid(1792, 896, max_tiles=12) == (4, 2)


def test_to_pixel_values_semantics():
    tile = Image.fromarray(np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3), "RGB")
    px = to_pixel_values([tile])
    x = torch.arange(256, dtype=torch.float32).div(255).reshape(16, 16)
    for c in range(3):
        assert torch.equal(px[0, c], (x - torch.tensor(IMAGENET_MEAN[c])) / torch.tensor(IMAGENET_STD[c]))
    with pytest.raises(ValueError, match="mode"):
        to_pixel_values([tile.convert("L")])


# ------------------------------------------------------------------------------------------------------------
# load_image
# ------------------------------------------------------------------------------------------------------------


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    _synthetic(64, 64).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 3), 7).save(gray)
    im = load_image(gray)
    assert im.mode == "RGB" and im.size == (5, 3)


# ------------------------------------------------------------------------------------------------------------
# Template
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _ids(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


_expected = expected_conversation


def _targets_decoded(tok, labels):
    """Contiguous runs of target tokens, decoded."""
    runs, cur = [], []
    for t in labels.tolist():
        if t == IGNORE_INDEX:
            if cur:
                runs.append(cur)
                cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_template_one_image(tok):
    conv = [
        {"from": "human", "value": "Please describe this image in detail."},
        {"from": "gpt", "value": "A cat sitting on a wooden table."},
    ]
    ids, labels = build_conversation(conv, [3], tokens_per_tile=4, tokenizer=tok)
    assert ids.dtype == torch.long and labels.dtype == torch.long and ids.shape == labels.shape
    img_start, img_end, ctx, im_start, im_end = _ids(tok, "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>")
    # exact layout, with <image>\n prefixed to the first user turn
    exp_ids, exp_labels = _expected(
        tok,
        DEFAULT_SYSTEM_MESSAGE,
        [("<image>\nPlease describe this image in detail.", "A cat sitting on a wooden table.")],
        [("<image>", "<img>" + "<IMG_CONTEXT>" * 12 + "</img>")],
    )
    assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    # image tokens: one contiguous block of 4*3 context tokens between <img> and </img>, followed by "\n"
    lst = ids.tolist()
    s = lst.index(img_start)
    assert lst[s + 1 : s + 13] == [ctx] * 12 and lst[s + 13] == img_end and lst.count(ctx) == 12
    assert tok.decode(lst[s + 14 :]).startswith("\nPlease describe")
    # whole-sequence decode is exactly the template text
    text = tok.decode(lst, skip_special_tokens=False)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nPlease describe this image in detail.<|im_end|>\n"
        "<|im_start|>assistant\nA cat sitting on a wooden table.<|im_end|>\n"
    )
    assert _targets_decoded(tok, labels) == ["A cat sitting on a wooden table.<|im_end|>"]
    # the target run ends with <|im_end|>; the very last token is the masked "\n"
    assert labels[-1].item() == IGNORE_INDEX and labels[-2].item() == im_end and ids[0].item() == im_start


def test_template_two_images_multi_turn(tok):
    conv = [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A rocket and an astronaut."},
        {"from": "human", "value": "How many people are there in the photo?"},
        {"from": "gpt", "value": "1"},
    ]
    ids, labels = build_conversation(conv, [5, 1], tokens_per_tile=2, tokenizer=tok)
    exp_ids, exp_labels = _expected(
        tok,
        DEFAULT_SYSTEM_MESSAGE,
        [(conv[0]["value"], conv[1]["value"]), (conv[2]["value"], conv[3]["value"])],
        [("<image>", "<img>" + "<IMG_CONTEXT>" * 10 + "</img>"), ("<image>", "<img>" + "<IMG_CONTEXT>" * 2 + "</img>")],
    )
    assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    ctx, img_start = _ids(tok, "<IMG_CONTEXT>", "<img>")
    assert ids.tolist().count(ctx) == 12 and ids.tolist().count(img_start) == 2
    # no image token is ever a target
    assert not torch.isin(labels, torch.tensor(_ids(tok, "<img>", "</img>", "<IMG_CONTEXT>"))).any()
    assert _targets_decoded(tok, labels) == ["A rocket and an astronaut.<|im_end|>", "1<|im_end|>"]
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert "<|im_start|>user\nImage-1: <img>" in text and text.count("<|im_start|>assistant\n") == 2


def test_template_text_only(tok):
    conv = [{"from": "human", "value": "What is 2024?"}, {"from": "gpt", "value": "A year."}]
    ids, labels = build_conversation(conv, [], tokens_per_tile=256, tokenizer=tok)
    exp_ids, exp_labels = _expected(tok, DEFAULT_SYSTEM_MESSAGE, [("What is 2024?", "A year.")], [])
    assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    assert "<image>" not in tok.decode(ids.tolist()) and _ids(tok, "<img>")[0] not in ids.tolist()
    assert _targets_decoded(tok, labels) == ["A year.<|im_end|>"]


def test_template_system_override(tok):
    conv = [
        {"from": "system", "value": "You are a vision language model."},
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "An astronaut."},
    ]
    ids, labels = build_conversation(conv, [1], tokens_per_tile=3, tokenizer=tok)
    exp_ids, exp_labels = _expected(
        tok,
        "You are a vision language model.",
        [("<image>\nDescribe.", "An astronaut.")],
        [("<image>", "<img>" + "<IMG_CONTEXT>" * 3 + "</img>")],
    )
    assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a vision language model.<|im_end|>\n")
    assert DEFAULT_SYSTEM_MESSAGE not in text
    assert _targets_decoded(tok, labels) == ["An astronaut.<|im_end|>"]
    # the keyword system_message is used when there is no system turn
    ids2, _ = build_conversation(conv[1:], [1], 3, tok, system_message="You are a vision language model.")
    assert torch.equal(ids, ids2)


def test_template_answer_with_leading_newline_masks_exactly(tok):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "\n\nanswer\n"}]
    ids, labels = build_conversation(conv, [], 1, tok)
    assert _targets_decoded(tok, labels) == ["\n\nanswer\n<|im_end|>"]
    assert tok.decode(ids.tolist(), skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n\n\nanswer\n<|im_end|>\n"
    )


def test_template_validation(tok):
    two = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match="2 <image> placeholder.*1 image"):
        build_conversation(two, [1], 4, tok)
    with pytest.raises(ValueError, match="placeholder"):
        build_conversation(two, [1, 1, 1], 4, tok)
    no_img = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "x"}]
    # two images but the (auto-prefixed) single placeholder covers only one
    with pytest.raises(ValueError, match="1 <image> placeholder.*2 image"):
        build_conversation(no_img, [1, 1], 4, tok)
    # placeholder without images
    with pytest.raises(ValueError, match="1 <image> placeholder.*0 image"):
        build_conversation([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], [], 4, tok)
    with pytest.raises(ValueError, match="alternate"):
        build_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], 4, tok)
    with pytest.raises(ValueError, match="alternate"):
        build_conversation([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], [], 4, tok)
    with pytest.raises(ValueError, match="end with a gpt"):
        build_conversation([{"from": "human", "value": "a"}], [], 4, tok)
    with pytest.raises(ValueError, match="unknown role"):
        build_conversation([{"from": "bot", "value": "a"}], [], 4, tok)


class _MergingNewlines:
    """Wraps a tokenizer and merges "\\n\\n" into one fake id (as real Qwen BPE does), so the assistant prefix's
    final "\\n" can fuse with an answer that starts with a newline."""

    NN = 10_000

    def __init__(self, tok):
        self.tok = tok
        self.nl = tok("\n", add_special_tokens=False)["input_ids"]

    def __call__(self, text, add_special_tokens=False):
        ids = self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        out = []
        for t in ids:
            if out and out[-1] == self.nl[0] and t == self.nl[0]:
                out[-1] = self.NN
            else:
                out.append(t)
        return {"input_ids": out}


def test_template_masks_exactly_when_prefix_fuses_with_answer(tok):
    fused = _MergingNewlines(tok)
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "\nanswer"}]
    ids, labels = build_conversation(conv, [], 1, fused)
    pre = fused("<|im_start|>assistant\n")["input_ids"]
    body = fused("\nanswer<|im_end|>")["input_ids"]
    n = len(pre) + len(body) + 1
    assert ids[-n:].tolist() == pre + body + fused.nl
    assert labels[-n:].tolist() == [IGNORE_INDEX] * len(pre) + body + [IGNORE_INDEX]
    assert (labels[:-n] == IGNORE_INDEX).all()
