"""Tests for tools/train_tiny.py: the scenes' geometry, a few training steps, and the committed clipseg-tiny model.

The trainer itself runs minutes; here it trains three steps: enough to prove that it runs, writes the published formats,
scores what it wrote and repeats its bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from clipseg_pipeline import inputs, reference
from clipseg_pipeline.architecture import Architecture
from clipseg_pipeline.params import Processor
from tools import synthetic, train_tiny
from tools.train_tiny import Shape

SIDE = 352


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- scenes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, area", [
    (Shape("red", "square", 100, 120, 40, 0), 80 * 80),
    (Shape("red", "ellipse", 150, 150, 60, 0, aspect=0.5), math.pi * 60 * 30),
    (Shape("red", "triangle", 170, 170, 80, 0), 3 * math.sqrt(3) / 4 * 80 ** 2),  # equilateral, circumradius 80
    (Shape("red", "square", 170, 170, 50, 30), 100 * 100),  # rotation keeps the area
])
def test_shape_masks_have_the_geometric_area(shape, area):
    assert train_tiny.shape_mask(shape, SIDE).sum().item() == pytest.approx(area, rel=0.02)


def test_a_square_at_no_angle_covers_exactly_its_pixels():
    mask = train_tiny.shape_mask(Shape("blue", "square", 100, 50, 10, 0), SIDE)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert (rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()) == (40, 59, 90, 109)


def test_a_later_shape_hides_what_it_covers_and_the_colours_follow_the_masks():
    shapes = [Shape("orange", "ellipse", 100, 100, 60, 0), Shape("blue", "square", 140, 100, 30, 0)]
    pixels, masks = train_tiny.render(shapes, SIDE)
    assert not (masks[0] & masks[1]).any()
    assert (masks[0] | masks[1]).equal(train_tiny.shape_mask(shapes[0], SIDE) | train_tiny.shape_mask(shapes[1], SIDE))
    for shape, mask in zip(shapes, masks):
        assert (pixels[mask] == torch.tensor(train_tiny.COLOURS[shape.colour], dtype=torch.uint8)).all()
    assert not (pixels[~(masks[0] | masks[1])] == torch.tensor(train_tiny.COLOURS["blue"], dtype=torch.uint8)).all(-1).any()


def test_random_scenes_hold_distinct_kinds_and_repeat_with_the_seed():
    def scenes(seed):
        generator = torch.Generator().manual_seed(seed)
        return [train_tiny.random_scene(generator, SIDE) for _ in range(5)]

    first, again, other = scenes(3), scenes(3), scenes(4)
    for (pixels, shapes, masks), (pixels2, _, _) in zip(first, again):
        assert 1 <= len(shapes) <= train_tiny.MAX_SHAPES and len({s.kind for s in shapes}) == len(shapes)
        assert len(masks) == len(shapes) and pixels.equal(pixels2)
    assert not all(a[0].equal(b[0]) for a, b in zip(first, other))


def test_prompts_take_the_right_article():
    assert train_tiny.prompt("orange", "ellipse") == "an orange ellipse"
    assert train_tiny.prompt("blue", "square") == "a blue square"


def test_the_crop_box_surrounds_the_shape_with_its_margin():
    mask = train_tiny.shape_mask(Shape("blue", "square", 100, 50, 10, 0), SIDE)  # rows 40-59, columns 90-109
    assert train_tiny.crop_box(mask, 0.5) == (80, 30, 120, 70)
    assert train_tiny.crop_box(mask, 5.0) == (0, 0, 210, 160)  # kept inside the image


def test_iou_counts_two_empty_masks_as_agreeing():
    empty = torch.zeros(4, 4, dtype=torch.bool)
    half = empty.clone()
    half[:2] = True
    assert train_tiny.iou(empty, empty) == 1.0 and train_tiny.iou(half, empty) == 0.0
    assert train_tiny.iou(half, torch.ones(4, 4, dtype=torch.bool)) == 0.5


# --- a few training steps -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_twice(tmp_path_factory):
    """Two runs of the trainer with the same settings (three steps of two scenes, the first at LOW_RES, on two threads
    as by default), each in its own folder. The trainer sets torch's thread count and deterministic mode: restored."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    settings = train_tiny.Settings(steps=3, low_res_steps=1, batch=2, lr=2e-3, threads=2)
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name)
        runs.append((out, train_tiny.write(out, settings, eval_scenes=2)))
    yield runs
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_the_trainer_writes_the_published_formats_and_its_record(trained_twice):
    out, record = trained_twice[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([*synthetic.SOURCE_NAMES.values(), "training.json"])
    assert json.loads((out / "training.json").read_text()) == record
    assert record["sha256"] == {name: sha256(out / name) for name in synthetic.SOURCE_NAMES.values()}
    tensors = train_tiny.load_sources(out)
    arch = train_tiny.architecture()
    assert record["architecture"] == arch
    initial = synthetic.clip_state_dict(arch, 0)
    # The same keys, order and dtypes as the random sources (fp16 where OpenAI stores fp16), but trained values.
    assert list(tensors)[:len(initial)] == list(initial)
    clip = {k: tensors[k] for k in initial}
    assert all(clip[k].dtype == initial[k].dtype for k in initial)
    assert not clip["visual.conv1.weight"].equal(initial["visual.conv1.weight"])
    assert list(tensors)[len(initial):] == list(synthetic.decoder_state_dict(arch, 0))
    assert set(record["held_out"]) == {"text_prompt_miou", "image_prompt_miou", "absent_prompt_pixel_share", "scenes"}
    assert record["held_out"]["scenes"] == 2 and 0 <= record["held_out"]["text_prompt_miou"] <= 1
    tokenizer = synthetic.tokenizer_files(synthetic.train_bpe(train_tiny.WORDS))
    assert all((out / synthetic.SOURCE_NAMES[name]).read_bytes() == tokenizer[name] for name in ("vocab", "merges", "bpe"))
    ids = inputs.token_ids(inputs.tokenizer(out), [train_tiny.prompt("orange", "ellipse")])["input_ids"]
    assert ids.shape == (1, 5)  # start, "an", "orange", "ellipse", end: each word one token


def test_the_same_seed_trains_the_same_bytes(trained_twice):
    (first_out, first), (second_out, second) = trained_twice
    assert first["sha256"] == second["sha256"]
    # The record too: it holds settings, scores and hashes, nothing that varies between runs (such as the time taken).
    assert (first_out / "training.json").read_bytes() == (second_out / "training.json").read_bytes()


def test_the_reference_trains_with_autograd():
    # The reference's operations must all be differentiable (no in-place step autograd needs the input of).
    arch_dict = train_tiny.architecture()
    arch = Architecture.from_mapping(arch_dict)
    weights = {k: t.float().requires_grad_() for k, t in {**synthetic.clip_state_dict(arch_dict, 0),
                                                           **synthetic.decoder_state_dict(arch_dict, 0)}.items()
               if t.is_floating_point()}
    ids = torch.tensor([[arch.text.vocab_size - 2, 5, arch.text.vocab_size - 1]])
    logits = reference.reference_forward(weights, arch, torch.randn(1, 3, 64, 64), ids)["logits"]
    logits.sum().backward()
    assert all(weights[k].grad is not None and weights[k].grad.abs().sum() > 0
               for k in ("visual.conv1.weight", "token_embedding.weight", "film_mul.weight", "trans_conv.0.weight",
                         "trans_conv.4.weight"))


def test_the_first_low_res_steps_draw_smaller_scenes_and_the_rest_the_processors(monkeypatch):
    sizes = []

    def draw_batch(generator, scenes, processor):
        sizes.append(processor.image_size)
        return drawn(generator, scenes, processor)

    drawn = train_tiny.draw_batch
    monkeypatch.setattr(train_tiny, "draw_batch", draw_batch)
    processor = Processor(image_size=SIDE, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    arch_dict = train_tiny.architecture()
    vocab = arch_dict["text"]["vocab_size"]
    ids = torch.tensor([[vocab - 2, 5, vocab - 1]] * len(train_tiny.KINDS))
    train_tiny.train(arch_dict, train_tiny.Settings(steps=3, low_res_steps=2, batch=1), processor, ids, log_every=0)
    assert sizes == [train_tiny.LOW_RES, train_tiny.LOW_RES, SIDE]


def test_a_batch_asks_for_each_shape_two_absent_kinds_and_one_crop_per_scene():
    processor = Processor(image_size=SIDE, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    generator = torch.Generator().manual_seed(3)
    drawn = train_tiny.draw_batch(generator, 3, processor)
    texts, crops = len(drawn.kinds), len(drawn.crop_kinds)
    assert drawn.images.shape == (3, 3, SIDE, SIDE) and drawn.crops.shape == (crops, 3, SIDE, SIDE) and crops == 3
    assert drawn.targets.shape == (texts + crops, SIDE, SIDE) and drawn.owners.shape == (texts + crops,)
    for scene in range(3):
        rows = (drawn.owners[:texts] == scene).nonzero().flatten()
        empty = [not drawn.targets[i].any() for i in rows]
        assert sum(empty) == train_tiny.ABSENT_PROMPTS  # the absent kinds' masks are empty, each shape's is not
        # Every target lies on the scene's shapes; the crop's target is the mask of a shape of that scene.
        assert not (drawn.targets[rows] & ~drawn.shapes[scene]).any()
        crop_row = texts + scene
        assert drawn.owners[crop_row] == scene and drawn.targets[crop_row].any()
        assert not (drawn.targets[crop_row] & ~drawn.shapes[scene]).any()
    # The crop's kind is the kind of the text prompt with the same mask.
    for k in range(crops):
        same = [i for i in range(texts) if drawn.targets[i].equal(drawn.targets[texts + k])]
        assert [int(drawn.kinds[i]) for i in same] == [int(drawn.crop_kinds[k])]


@pytest.mark.parametrize("argv, message", [
    (["--low-res-steps", "2401"], "--low-res-steps must be between 0 and --steps (2400), got 2401"),
    (["--steps", "10", "--low-res-steps", "-1"], "--low-res-steps must be between 0 and --steps (10), got -1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--eval-scenes", "0"], "--eval-scenes must be at least 1, got 0"),
])
def test_settings_that_cannot_train_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        train_tiny.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the committed default ------------------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "synthetic" / "clipseg-tiny"


def test_the_committed_default_is_what_the_trainer_recorded_and_params_pin():
    import yaml

    record = json.loads((COMMITTED / "training.json").read_text())
    assert record["sha256"] == {name: sha256(COMMITTED / name) for name in synthetic.SOURCE_NAMES.values()}
    # Written by the trainer's defaults (`--out data/synthetic/clipseg-tiny --seed 0` reproduces it), for the
    # architecture params.yaml declares.
    defaults = vars(train_tiny.argument_parser().parse_args(["--out", "x"]))
    settings = [field.name for field in dataclasses.fields(train_tiny.Settings)]
    assert {k: record[k] for k in settings} == {k: defaults[k] for k in settings}
    assert set(record) == {*settings, "architecture", "held_out", "sha256"}
    tiny = yaml.safe_load((COMMITTED.parents[2] / "params.yaml").read_text())["models"]["clipseg-tiny"]
    assert record["architecture"] == tiny["architecture"] == train_tiny.architecture()
    pins = {Path(source["url"]).name: source["sha256"] for source in tiny["sources"].values()}
    assert pins == {name: digest for name, digest in record["sha256"].items() if name in pins}
    assert tiny["verify"]["prompts"] == train_tiny.REFERENCE_PROMPTS
    assert [tuple(box) for box in tiny["verify"]["image_prompts"]] == [train_tiny.REFERENCE_IMAGE_PROMPT]
    assert sum((COMMITTED / name).stat().st_size for name in record["sha256"]) < 5_000_000


def test_the_committed_default_segments_its_reference_image():
    # The committed files, read by the pipeline's readers and run by the reference on the committed image: each
    # named shape found, nothing for the prompt naming none, and the image prompt (a crop of the triangle) finds it.
    from PIL import Image

    from clipseg_pipeline.params import load

    processor = load().processor
    arch = Architecture.from_mapping(train_tiny.architecture())
    tensors = train_tiny.load_sources(COMMITTED)
    _, masks = train_tiny.reference_image(processor.image_size)
    with Image.open(COMMITTED / "image.jpg") as image:
        scene = image.convert("RGB")
    pixels = inputs.pixel_values(scene, processor.image_size, processor.image_mean, processor.image_std)
    ids = inputs.token_ids(inputs.tokenizer(COMMITTED), train_tiny.REFERENCE_PROMPTS)["input_ids"]
    with torch.inference_mode():
        logits = reference.reference_forward(tensors, arch, pixels, ids)["logits"]
        crop = inputs.prompt_pixel_values(scene, [train_tiny.REFERENCE_IMAGE_PROMPT], processor.image_size,
                                          processor.image_mean, processor.image_std, "the image prompt")
        image_logits = reference.image_prompt_forward(tensors, arch, pixels, crop)["logits"]
    assert all(train_tiny.iou(l > 0, m) > 0.7 for l, m in zip(logits, masks))
    assert (logits[3] > 0).float().mean() < 0.01
    assert train_tiny.iou(image_logits[0] > 0, masks[2]) > 0.7
