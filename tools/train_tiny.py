"""Train the clipseg-tiny default: seed -> CLIP + decoder files in the published formats that segment coloured shapes.

Scenes are drawn on the fly: one to four shapes (an ellipse, a square or a triangle, each in one of six colours) on a
muted background, and their true masks. The model is the synthetic tiny architecture with the refined decoder's
upsampling, started from its random weights; most steps draw scenes at CLIP's own 224 px (a quarter of the time), the
last ones at the processor's 352 px, the size the pipeline runs at. Every forward pass is the project's reference of
the original model (`clipseg_pipeline.reference`, plain torch), so training needs nothing from transformers. Each
scene conditions the decoder on text prompts naming its shapes ("an orange ellipse"), two prompts naming kinds it does
not hold (their masks are empty) and one image prompt, a crop of the scene around one of its shapes (docs/pipeline.md
says why the loss has the terms it has). Every weight is trained, CLIP's too: nothing pretrained is available here.

What is written is what `python -m tools.synthetic` writes for a random variant, trained: OpenAI's TorchScript CLIP
archive (fp16 where OpenAI stores fp16), the decoder zip, the tokenizer files, plus the reference image of the default
variant (a fixed scene) and `training.json` (the settings, the held-out scores and every file's sha256). The held-out
scores are computed from the written files, read back by the pipeline's own readers, on scenes never trained on.

    python -m tools.train_tiny --out data/synthetic/clipseg-tiny --seed 0

The same settings give the same bytes again on the same kind of machine and torch build (torch's deterministic
algorithms keep the threaded backward pass's float32 sums in one order); another CPU or torch version may round
differently and train a similar model, not the committed bytes. The tokenizer files and the reference image are the
same bytes everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from clipseg_pipeline import inputs, original, reference
from clipseg_pipeline.architecture import Architecture
from clipseg_pipeline.params import Processor
from clipseg_pipeline.params import load as load_params
from tools import synthetic

COLOURS = {  # RGB, far apart in hue so that a colour word names one of them
    "red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (230, 210, 40),
    "green": (40, 165, 60), "blue": (40, 90, 215), "purple": (140, 60, 190),
}
SHAPES = ("ellipse", "square", "triangle")
KINDS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
# The tokenizer's training words: the generator's own, and those of the prompts here.
WORDS = [*synthetic.BPE_CORPUS, *COLOURS, *SHAPES]
MAX_SHAPES = 4
ABSENT_PROMPTS = 2  # prompts per training scene naming a kind it does not hold
# The default variant's reference image: three shapes, and the words of its prompts (the last names none of them).
REFERENCE_SCENE = (  # colour, shape, centre x, centre y, size (radius or half side), rotation (degrees)
    ("orange", "ellipse", 105, 110, 70, 20),
    ("blue", "square", 260, 120, 55, 15),
    ("green", "triangle", 170, 265, 70, 0),
)
REFERENCE_PROMPTS = ["an orange ellipse", "a blue square", "a green triangle", "a purple ellipse"]
REFERENCE_IMAGE_PROMPT = (95, 190, 245, 340)  # a crop around the green triangle (left, top, right, bottom)
DECODER_MEMBER = "tiny-uni.pth"
HELD_OUT_SEED_OFFSET = 1_000_000  # held-out scenes come from their own stream, never drawn in training
ALIGN_SCALE = 10.0  # CLIP-style temperature of the crop-caption similarities
MASK_THRESHOLD = 0.0  # logit 0 is sigmoid 0.5, the mask the pipeline draws
MAX_SOURCE_BYTES = 1 << 30  # the readers' bound on a file's size: far above the tiny model's
LOW_RES = 224  # CLIP's own input size: a step on scenes this size takes a quarter of the time of one at 352


def prompt(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


# ---------------------------------------------------------------------------------------------
# Scenes (pure)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: float
    y: float
    size: float
    angle: float  # degrees
    aspect: float = 0.6  # an ellipse's short radius over its long one

    @property
    def kind(self) -> tuple[str, str]:
        return self.colour, self.shape


@functools.cache
def _pixel_centres(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    return y, x


def shape_mask(shape: Shape, side: int) -> torch.Tensor:
    """bool [side, side]: the pixels whose centres lie inside the shape."""
    y, x = _pixel_centres(side)
    theta = math.radians(shape.angle)
    u = math.cos(theta) * (x - shape.x) + math.sin(theta) * (y - shape.y)
    v = -math.sin(theta) * (x - shape.x) + math.cos(theta) * (y - shape.y)
    if shape.shape == "ellipse":
        return (u / shape.size) ** 2 + (v / (shape.size * shape.aspect)) ** 2 <= 1
    if shape.shape == "square":
        return (u.abs() <= shape.size) & (v.abs() <= shape.size)
    # An equilateral triangle with circumradius `size`, pointing up before rotation: inside its three edges.
    inside = torch.ones(side, side, dtype=torch.bool)
    for k in range(3):
        normal = math.radians(90 + 120 * k)
        inside &= u * math.cos(normal) + v * math.sin(normal) <= shape.size / 2
    return inside


def render(shapes: list[Shape], side: int, generator: torch.Generator | None = None,
           background: tuple[tuple[float, ...], tuple[float, ...]] = ((120, 125, 130), (160, 155, 150)),
           jitter: float = 0.0, noise: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shapes drawn in order over a diagonal gradient -> (uint8 [side, side, 3], each shape's visible mask)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    t = ((x + y) / 2).unsqueeze(-1)
    rgb = torch.tensor(background[0]) * (1 - t) + torch.tensor(background[1]) * t
    masks = []
    for shape in shapes:
        mask = shape_mask(shape, side)
        colour = torch.tensor(COLOURS[shape.colour], dtype=torch.float32)
        if jitter:
            colour = colour + jitter * (2 * torch.rand(3, generator=generator) - 1)
        rgb[mask] = colour
        masks = [m & ~mask for m in masks] + [mask]  # a later shape hides what it covers
    if noise:
        rgb = rgb + noise * torch.randn(rgb.shape, generator=generator)
    return rgb.round().clamp(0, 255).to(torch.uint8), masks


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_scene(generator: torch.Generator, side: int) -> tuple[torch.Tensor, list[Shape], list[torch.Tensor]]:
    """One to MAX_SHAPES shapes of distinct kinds, placed so that none hides most of another."""
    count = int(torch.randint(1, MAX_SHAPES + 1, (), generator=generator))
    kinds = [KINDS[i] for i in torch.randperm(len(KINDS), generator=generator)[:count].tolist()]
    shapes: list[Shape] = []
    for colour, kind in kinds:
        for _ in range(20):  # a free place is nearly always found; otherwise the shape overlaps a little more
            size = _uniform(generator, 0.09, 0.22) * side
            candidate = Shape(colour, kind, _uniform(generator, size, side - size), _uniform(generator, size, side - size),
                              size, _uniform(generator, 0, 360), _uniform(generator, 0.5, 0.75))
            if all(math.dist((s.x, s.y), (candidate.x, candidate.y)) > 0.8 * (s.size + candidate.size) for s in shapes):
                break
        shapes.append(candidate)
    low = [_uniform(generator, 70, 190)] * 3
    high = [_uniform(generator, 70, 190)] * 3
    background = (tuple(v + _uniform(generator, -12, 12) for v in low), tuple(v + _uniform(generator, -12, 12) for v in high))
    pixels, masks = render(shapes, side, generator, background, jitter=18.0, noise=4.0)
    return pixels, shapes, masks


def crop_box(mask: torch.Tensor, margin: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) around the mask's pixels, widened by `margin` times its larger side, in the image."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = int(margin * max(bottom - top, right - left))
    side = mask.shape[0]
    return max(0, left - pad), max(0, top - pad), min(side, right + pad), min(side, bottom + pad)


# ---------------------------------------------------------------------------------------------
# Inputs as the pipeline feeds them
# ---------------------------------------------------------------------------------------------

# Training prepares images in torch, nearly as the processor does (its PIL resize differs in the last bits): a scene is
# drawn at the processor's size, so only crops are resized. The held-out scores use the pipeline's own `inputs`.

def normalize(pixels: torch.Tensor, processor: Processor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], as the processor rescales and normalizes."""
    scaled = pixels.float() / 255
    return ((scaled - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)).movedim(-1, -3)


def crop_prompt(pixels: torch.Tensor, box, processor: Processor) -> torch.Tensor:
    """A crop resized to the processor's size (bilinear, as the processor resizes a larger image up) and normalized."""
    left, top, right, bottom = box
    crop = normalize(pixels[top:bottom, left:right], processor).unsqueeze(0)
    side = processor.image_size
    return F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def forward(weights, arch: Architecture, images: torch.Tensor, owners: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, S, S], the image each condition is for [C], conditions [C, proj] -> logits [C, S, S]."""
    vision = reference.encode_image(weights, arch, images)
    activations = [vision[f"vision.block{k}"][owners] for k in arch.extract_layers]
    return reference.decode(weights, arch, activations, conditions)["logits"]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over every pixel and again over the pixels of the scene's shapes, plus soft Dice where the
    prompt names a shape. Background is learnt in a few steps and then dominates the first term; the second keeps
    weight on telling the named shape from the others (without it the decoder marks every shape whatever it is asked)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    on_shapes = (per_pixel * shapes).sum() / shapes.sum().clamp(min=1)
    present = targets.flatten(1).sum(1) > 0
    p, t = logits.sigmoid().flatten(1)[present], targets.flatten(1)[present]
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + on_shapes + dice.mean()


@dataclass
class Batch:
    """One step's scenes and what each condition asks for. Conditions are the text prompts (their kinds' captions),
    then the image prompts (crops); `owners` names the scene each condition is for, `targets` its true mask."""

    images: torch.Tensor  # [B, 3, S, S]
    shapes: torch.Tensor  # bool [B, S, S]: every shape of the scene
    kinds: torch.Tensor  # [T]: the kind each text prompt names (an index into KINDS)
    crops: torch.Tensor | None  # [K, 3, S, S]: the image prompts
    crop_kinds: torch.Tensor  # [K]: the kind each crop shows
    owners: torch.Tensor  # [T + K]
    targets: torch.Tensor  # bool [T + K, S, S]


def draw_batch(generator: torch.Generator, scenes: int, processor: Processor) -> Batch:
    """`scenes` random scenes, each with text prompts for its shapes, ABSENT_PROMPTS for kinds it lacks (empty
    masks) and one crop around one of its shapes."""
    side = processor.image_size
    images, shapes_of, owners, kinds, targets = [], [], [], [], []
    crops, crop_owners, crop_kinds, crop_targets = [], [], [], []
    for b in range(scenes):
        pixels, shapes, masks = random_scene(generator, side)
        images.append(normalize(pixels, processor))
        shapes_of.append(torch.stack(masks).any(0))
        present = {s.kind for s in shapes}
        absent = [k for k in KINDS if k not in present]
        named = [(s.kind, m) for s, m in zip(shapes, masks)]
        for i in torch.randperm(len(absent), generator=generator)[:ABSENT_PROMPTS].tolist():
            named.append((absent[i], torch.zeros(side, side, dtype=torch.bool)))
        for kind, mask in named:
            owners.append(b), kinds.append(KINDS.index(kind)), targets.append(mask)
        pick = int(torch.randint(len(shapes), (), generator=generator))
        if masks[pick].any():  # a shape may be hidden under later ones
            crops.append(crop_prompt(pixels, crop_box(masks[pick], _uniform(generator, 0.05, 0.4)), processor))
            crop_owners.append(b), crop_kinds.append(KINDS.index(shapes[pick].kind)), crop_targets.append(masks[pick])
    return Batch(torch.stack(images), torch.stack(shapes_of), torch.tensor(kinds), torch.cat(crops) if crops else None,
                 torch.tensor(crop_kinds, dtype=torch.long), torch.tensor(owners + crop_owners),
                 torch.stack(targets + crop_targets))


@dataclass(frozen=True)
class Settings:
    """What a run is given, recorded in training.json; the defaults are the committed model's."""

    seed: int = 0
    steps: int = 2400
    low_res_steps: int = 2250  # the first steps draw scenes at LOW_RES, the rest at the size the pipeline runs at
    batch: int = 6  # scenes a step
    lr: float = 3e-3  # AdamW's peak learning rate
    weight_decay: float = 0.1  # AdamW's: keeps the decoder's attention scores from growing (docs/pipeline.md)
    threads: int = 2


def train(arch_dict: dict, settings: Settings, processor: Processor, token_ids: torch.Tensor,
          log_every: int = 50) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tiny model's weights trained from `synthetic`'s random ones -> (CLIP state dict, decoder state dict) as the
    published files hold them (same keys, order and dtypes). `token_ids` [len(KINDS), L]: the prompt of each kind."""
    arch = Architecture.from_mapping(arch_dict)
    clip = synthetic.clip_state_dict(arch_dict, settings.seed)
    decoder = synthetic.decoder_state_dict(arch_dict, settings.seed)
    weights = {k: t.float().requires_grad_() for k, t in {**clip, **decoder}.items() if t.is_floating_point()}
    optimizer = torch.optim.AdamW(weights.values(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    steps = settings.steps
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(settings.seed)
    low_res = dataclasses.replace(processor, image_size=LOW_RES)
    started = time.perf_counter()
    for step in range(steps):
        drawn = draw_batch(generator, settings.batch, low_res if step < settings.low_res_steps else processor)
        text = reference.encode_text(weights, arch, token_ids)["conditional_embeddings"]
        conditions = [text[drawn.kinds]]
        if drawn.crops is not None:
            conditions.append(reference.encode_image(weights, arch, drawn.crops)["pooled_output"])
        logits = forward(weights, arch, drawn.images, drawn.owners, torch.cat(conditions))
        loss = loss_fn(logits, drawn.targets.float(), drawn.shapes[drawn.owners].float())
        if drawn.crops is not None:
            # CLIP's own objective, over the kinds: each crop's embedding nearest its kind's caption among all captions.
            # It keeps the captions apart (else the decoder learns to ignore them) and lets an image prompt act as the
            # text naming what it shows.
            similarity = F.normalize(conditions[1], dim=-1) @ F.normalize(text, dim=-1).T
            loss = loss + F.cross_entropy(ALIGN_SCALE * similarity, drawn.crop_kinds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights.values(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1:>5}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:6.0f} s", flush=True)
    trained = {k: t.detach() for k, t in weights.items()}

    def as_stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: trained[k].to(t.dtype) if k in trained else t for k, t in state.items()}

    return as_stored(clip), as_stored(decoder)


# ---------------------------------------------------------------------------------------------
# Held-out scores, from the written files
# ---------------------------------------------------------------------------------------------

def iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    union = (predicted | truth).sum()
    return float((predicted & truth).sum() / union) if union else 1.0


@torch.no_grad()
def evaluate(directory: Path, arch: Architecture, scenes: int, seed: int, processor: Processor) -> dict[str, float]:
    """Scores on `scenes` held-out scenes of the model in `directory`'s clip.pt and weights.zip, run by the reference
    on inputs prepared as the pipeline prepares them (`clipseg_pipeline.inputs`): mean IoU of the masks (logit > 0)
    for text prompts naming a present shape and for image prompts (a crop around each shape), and the share of pixels
    marked for a prompt naming an absent shape."""
    tensors = load_sources(directory)
    tok = inputs.tokenizer(directory)
    size, mean, std = processor.image_size, processor.image_mean, processor.image_std
    generator = torch.Generator().manual_seed(seed + HELD_OUT_SEED_OFFSET)
    text_ious, image_ious, absent_share = [], [], []
    for index in range(scenes):
        pixels, shapes, masks = random_scene(generator, size)
        present = {s.kind for s in shapes}
        absent = [k for k in KINDS if k not in present]
        absent_kind = absent[int(torch.randint(len(absent), (), generator=generator))]
        prompts = [prompt(*s.kind) for s in shapes] + [prompt(*absent_kind)]
        ids = inputs.token_ids(tok, prompts)["input_ids"]
        scene = Image.fromarray(pixels.numpy())
        image = inputs.pixel_values(scene, size, mean, std)
        logits = reference.reference_forward(tensors, arch, image, ids)["logits"]
        text_ious += [iou(l > MASK_THRESHOLD, m) for l, m in zip(logits, masks) if m.any()]
        absent_share.append(float((logits[-1] > MASK_THRESHOLD).float().mean()))
        visible = [m for m in masks if m.any()]
        crops = inputs.prompt_pixel_values(scene, [crop_box(m, 0.2) for m in visible], size, mean, std,
                                           f"held-out scene {index}")
        image_logits = reference.image_prompt_forward(tensors, arch, image, crops)["logits"]
        image_ious += [iou(l > MASK_THRESHOLD, m) for l, m in zip(image_logits, visible)]
    return {"text_prompt_miou": round(sum(text_ious) / len(text_ious), 4),
            "image_prompt_miou": round(sum(image_ious) / len(image_ious), 4),
            "absent_prompt_pixel_share": round(sum(absent_share) / len(absent_share), 4),
            "scenes": scenes}


def load_sources(directory: Path) -> dict[str, torch.Tensor]:
    """The original tensors of clip.pt and weights.zip in `directory`, read by the pipeline's own readers (the decoder
    unpacked from the zip into a temporary folder, as the download stage unpacks it)."""
    with tempfile.TemporaryDirectory() as tmp:
        decoder = original.extract_member(directory / "weights.zip", DECODER_MEMBER, Path(tmp) / DECODER_MEMBER,
                                          MAX_SOURCE_BYTES)
        return {**original.load_clip(directory / "clip.pt", pinned=True, max_bytes=MAX_SOURCE_BYTES),
                **original.load_decoder(decoder, max_bytes=MAX_SOURCE_BYTES)}


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------

def architecture() -> dict:
    """The synthetic tiny preset, its token table sized for the tokenizer trained on WORDS, with the refined decoder's
    upsampling (a 3x3 convolution before two transposed ones): a patch's pixels then see its neighbours, so shapes'
    edges fall inside patches where they should; the plain one draws a patch from its own features alone."""
    arch = synthetic.preset_arch("tiny")
    arch["text"]["vocab_size"] = synthetic.tokenizer_vocab_size(WORDS)
    arch["use_complex_transposed_convolution"] = True
    return arch


def reference_image(side: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shapes = [Shape(c, s, x, y, size, angle) for c, s, x, y, size, angle in REFERENCE_SCENE]
    return render(shapes, side)


def write(out: Path, settings: Settings, eval_scenes: int) -> dict:
    """Train, write every file into a staging folder, score it, then move the files into `out`."""
    torch.set_num_threads(settings.threads)
    # The threaded backward pass's float32 sums in one order: without it two runs part within a dozen steps.
    torch.use_deterministic_algorithms(True)
    processor = load_params().processor
    arch_dict = architecture()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=out) as tmp:
        staging = Path(tmp)
        synthetic.write_tokenizer_files(staging, WORDS)
        ids = inputs.token_ids(inputs.tokenizer(staging), [prompt(*k) for k in KINDS])["input_ids"]
        started = time.perf_counter()
        clip, decoder = train(arch_dict, settings, processor, ids)
        # Printed, not recorded: training.json describes the files written, not how long a run took.
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
        synthetic.write_clip_torchscript(clip, staging / "clip.pt")
        synthetic.write_decoder_zip(decoder, staging / "weights.zip", DECODER_MEMBER)
        pixels, _ = reference_image(processor.image_size)
        synthetic.write_jpeg(pixels, staging / "image.jpg")
        scores = evaluate(staging, Architecture.from_mapping(arch_dict), eval_scenes, settings.seed, processor)
        files = {name: staging / file for name, file in synthetic.SOURCE_NAMES.items()}
        record = {
            **dataclasses.asdict(settings), "architecture": arch_dict, "held_out": scores,
            "sha256": {path.name: synthetic.sha256_file(path) for path in files.values()},
        }
        (staging / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for path in [*files.values(), staging / "training.json"]:
            shutil.move(path, out / path.name)
    return record


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.train_tiny",
        description="Train the clipseg-tiny default model on synthetic scenes of coloured shapes and write its source "
                    "files (published formats) with training.json (settings, held-out mean IoU, sha256 of each file).")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the sources into")
    default = Settings()
    parser.add_argument("--seed", type=int, default=default.seed,
                        help=f"seed of the initial weights and of every scene (default {default.seed})")
    parser.add_argument("--steps", type=int, default=default.steps,
                        help=f"optimizer steps (default {default.steps}: about 10 minutes on 2 cores)")
    parser.add_argument("--low-res-steps", type=int, default=default.low_res_steps,
                        help=f"how many of the first steps draw scenes at {LOW_RES} px instead of the processor's size, "
                             f"each in a quarter of the time (default {default.low_res_steps})")
    parser.add_argument("--batch", type=int, default=default.batch, help=f"scenes per step (default {default.batch})")
    parser.add_argument("--lr", type=float, default=default.lr, help=f"AdamW peak learning rate (default {default.lr})")
    parser.add_argument("--weight-decay", type=float, default=default.weight_decay,
                        help=f"AdamW decoupled weight decay (default {default.weight_decay}: keeps the decoder's "
                             "attention scores from growing)")
    parser.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes scored (default 200)")
    parser.add_argument("--threads", type=int, default=default.threads, help=f"torch threads (default {default.threads})")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "eval_scenes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.low_res_steps <= args.steps:
        parser.error(f"--low-res-steps must be between 0 and --steps ({args.steps}), got {args.low_res_steps}")
    settings = Settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)})
    record = write(args.out, settings, args.eval_scenes)
    for name, digest in record["sha256"].items():
        print(f"{digest}  {args.out / name}")
    held_out = record["held_out"]
    print(f"held-out mean IoU on {held_out['scenes']} scenes: text prompts {held_out['text_prompt_miou']:.3f}, image "
          f"prompts {held_out['image_prompt_miou']:.3f}; prompts naming an absent shape mark "
          f"{100 * held_out['absent_prompt_pixel_share']:.2f}% of the pixels")


if __name__ == "__main__":
    main()
