"""Train and evaluate the `digits` reference models (see `fastdiff.models.digits`).

    python -m fastdiff.models.train digits   --out fastdiff/models/weights/digits --seed 0
    python -m fastdiff.models.train digits-sd3 --out fastdiff/models/weights/digits-sd3 --seed 0
    python -m fastdiff.models.train features --out fastdiff/models/weights/digits_features.safetensors --seed 0
    python -m fastdiff.models.train evaluate --n 1000

Everything random draws from generators seeded by `--seed`, and torch runs on at most two
threads, so a run is reproducible on the same machine. Training uses the training split
only; the held-out split is what FID-digits and the classifier's accuracy are measured on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from ..check_only import exit_if_check_only
from ..core.objectives import noise_prediction_loss, optimizer_step, velocity_loss
from .digits import (
    DIGITS_FEATURES_FILE,
    DIGITS_GUIDANCE_SCALE,
    DIGITS_IMAGE_SIZE,
    DIGITS_PIPELINE_DIR,
    DigitsFeatureNet,
    build_digits_pipeline,
    digit_prompt,
    digits_split,
    load_digits_pipeline,
    load_feature_network,
    to_unit_range,
)

__all__ = [
    "DEFAULT_DIGITS_STEPS",
    "evaluate_digits",
    "frechet_distance",
    "generate_digits",
    "main",
    "train_digits",
    "train_feature_network",
    "train_vae",
]

Log = Callable[[str], None]

DEFAULT_DIGITS_STEPS = 3000
DEFAULT_DIGITS_SD3_STEPS = 3000
DEFAULT_VAE_STEPS = 1000
DEFAULT_FEATURE_STEPS = 1500
PROMPT_DROPOUT = 0.1


def _quiet(_: str) -> None:
    pass


def _model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1], the range SD's VAE encodes."""
    return to_unit_range(images) * 2 - 1


def _batch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch_size,), generator=generator)


def _noised_batch(latents: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean latents, prompt indices with ``PROMPT_DROPOUT`` of them the empty prompt, noise).

    Randomness is drawn on the CPU so a seed means the same run on any device.
    """
    index = _batch_indices(len(latents), batch_size, generator)
    clean, prompt_ids = latents[index], labels[index].clone()
    prompt_ids[torch.rand(batch_size, generator=generator) < PROMPT_DROPOUT] = len(_training_prompts()) - 1
    return clean, prompt_ids, torch.randn(clean.shape, generator=generator)


# --------------------------------------------------------------------------- VAE


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int = DEFAULT_VAE_STEPS,
    batch_size: int = 128,
    lr: float = 2e-3,
    kl_weight: float = 1e-5,
    generator: torch.Generator,
    log: Log = _quiet,
) -> None:
    """Fit the one-level VAE to reconstruct digits, then set its latent scaling factor.

    Reconstruction dominates (the VAE is meant to be nearly the identity); the small KL term
    only keeps the latent bounded and the decoder tolerant of the slightly-off latents a
    diffusion model produces, which is the job it does in Stable Diffusion too.
    """
    data = _model_range(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    vae.train()
    for step in range(steps):
        batch = data[_batch_indices(len(data), batch_size, generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    vae.register_to_config(scaling_factor=_latent_scaling(vae, data))


@torch.no_grad()
def _latent_scaling(vae: AutoencoderKL, data: torch.Tensor) -> float:
    """1 / std of the latents, as SD chose 0.18215: the UNet then sees unit-variance inputs."""
    return float(1.0 / vae.encode(data).latent_dist.mode().std())


@torch.no_grad()
def _encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means: computed once, since the VAE is frozen while the UNet trains."""
    return vae.encode(_model_range(images)).latent_dist.mode() * vae.config.scaling_factor


# --------------------------------------------------------------------------- denoiser


def _training_prompts() -> list[str]:
    """The ten digit prompts, then the empty prompt CFG uses as its unconditional branch."""
    return [digit_prompt(label) for label in range(10)] + [""]


def _train_denoiser(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log: Log,
) -> None:
    """Epsilon-prediction training of UNet and text encoder together, with EMA weights.

    The text encoder trains jointly because only eleven prompts exist: encoding all of them
    once per step costs next to nothing, and a trained encoder separates "six" from "seven"
    far more clearly than a random one whose outputs differ only in the last few bytes.
    """
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    device = unet.device
    prompts = _training_prompts()

    def batch_loss() -> torch.Tensor:
        clean, prompt_ids, noise = _noised_batch(latents, labels, batch_size, generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        clean, noise, timesteps, prompt_ids = (t.to(device) for t in (clean, noise, timesteps, prompt_ids))
        embeds, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return noise_prediction_loss(unet, scheduler, clean, noise, timesteps, embeds[prompt_ids])

    _fit([unet, text_encoder], batch_loss, steps=steps, lr=lr, label="unet", log=log)


def _fit(modules: Sequence[torch.nn.Module], batch_loss: Callable[[], torch.Tensor], *, steps: int, lr: float,
         label: str, log: Log) -> None:
    """AdamW with warm-up and cosine decay, gradient clipping and EMA weights (copied in at the
    end) over all parameters of ``modules``; one ``batch_loss()`` per step."""
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(200, steps // 10), steps)
    ema = EMAModel(parameters, decay=0.9995, use_ema_warmup=True, power=3 / 4)
    for module in modules:
        module.train().requires_grad_(True)
    started = time.perf_counter()
    for step in range(steps):
        loss = batch_loss()
        optimizer_step(parameters, optimizer, loss)
        schedule.step()
        ema.step(parameters)
        if step % 100 == 0 or step == steps - 1:
            log(f"{label} step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    ema.copy_to(parameters)
    for module in modules:
        module.eval()


def train_digits(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_DIGITS_STEPS,
    vae_steps: int = DEFAULT_VAE_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    log: Log = _quiet,
) -> StableDiffusionPipeline:
    """Train the digits pipeline on the training split; save it to `out` (if given).

    The VAE is trained first and frozen, then the UNet and text encoder on its latents,
    as Stable Diffusion was built.
    """
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels, _, _ = digits_split(seed=0)
    pipe = build_digits_pipeline(seed)
    started = time.perf_counter()
    train_vae(pipe.vae, train_images, steps=vae_steps, batch_size=batch_size, generator=generator, log=log)
    latents = _encode_latents(pipe.vae, train_images)
    log(f"vae done in {time.perf_counter() - started:.0f} s, scaling_factor {pipe.vae.config.scaling_factor:.4f}")
    _train_denoiser(
        pipe, latents, train_labels, steps=steps, batch_size=batch_size, lr=lr, generator=generator, log=log
    )
    log(f"training done in {time.perf_counter() - started:.0f} s")
    pipe.set_progress_bar_config(disable=True)
    if out is not None:
        pipe.save_pretrained(str(out))
    return pipe


# --------------------------------------------------------------------------- the SD3 (MMDiT) digits model


def _train_flow_transformer(
    pipe: Any,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log: Log,
) -> None:
    """Rectified-flow training of the transformer and both text encoders, with EMA weights.

    As SD3 was trained: the noisy latent is ``(1 - s)·x + s·noise`` at a noise level ``s`` drawn
    logit-normal (most samples at middling noise, where the velocity is hardest to predict),
    the transformer sees ``1000·s`` as its timestep and predicts the velocity ``noise - x``.
    """
    from .digits_mmdit import DIGITS_SD3_CALL as call

    transformer = pipe.transformer
    device = transformer.device
    prompts = _training_prompts()
    train_steps = pipe.scheduler.config.num_train_timesteps

    def batch_loss() -> torch.Tensor:
        clean, prompt_ids, noise = _noised_batch(latents, labels, batch_size, generator)
        sigmas = torch.sigmoid(torch.randn(batch_size, generator=generator))
        clean, noise, sigmas, prompt_ids = (t.to(device) for t in (clean, noise, sigmas, prompt_ids))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, **call)
        return velocity_loss(transformer, clean, noise, sigmas, embeds[prompt_ids], pooled[prompt_ids], train_steps)

    _fit([transformer, pipe.text_encoder, pipe.text_encoder_2], batch_loss, steps=steps, lr=lr, label="transformer",
         log=log)
    for module in (transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)


def train_digits_sd3(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_DIGITS_SD3_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    log: Log = _quiet,
) -> Any:
    """Train the digits-sd3 pipeline on the training split (on the frozen digits VAE's latents);
    save it to ``out`` (if given)."""
    from .digits_mmdit import build_digits_sd3_pipeline

    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels, _, _ = digits_split(seed=0)
    pipe = build_digits_sd3_pipeline(seed)
    latents = _encode_latents(pipe.vae, train_images)
    started = time.perf_counter()
    _train_flow_transformer(pipe, latents, train_labels, steps=steps, batch_size=batch_size, lr=lr,
                            generator=generator, log=log)
    log(f"training done in {time.perf_counter() - started:.0f} s")
    if out is not None:
        pipe.save_pretrained(str(out))
    return pipe


# --------------------------------------------------------------------------- feature network


def train_feature_network(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_FEATURE_STEPS,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: Log = _quiet,
) -> tuple[DigitsFeatureNet, float]:
    """Train the classifier on the training split; return it and its held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels, held_images, held_labels = digits_split(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), steps)
    net.train()
    for step in range(steps):
        index = _batch_indices(len(train_images), batch_size, generator)
        loss = F.cross_entropy(net.logits(train_images[index]), train_labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"features step {step}: loss {loss.item():.4f}")
    net.eval().requires_grad_(False)
    accuracy = (net.classify(held_images) == held_labels).float().mean().item()
    log(f"held-out accuracy {accuracy:.4f}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in net.state_dict().items()}, str(out))
    return net, accuracy


# --------------------------------------------------------------------------- evaluation


def generate_digits(
    pipe: StableDiffusionPipeline,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = DIGITS_GUIDANCE_SCALE,
    batch_size: int = 250,
    **call_kwargs: Any,
) -> torch.Tensor:
    """uint8 images N x 3 x H x W, image i from prompt `labels[i]` and its own seed.

    One generator per image, so an image does not depend on the batch it was drawn in.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    chunks = []
    for start in range(0, len(labels), batch_size):
        chunk = range(start, min(start + batch_size, len(labels)))
        images = pipe(
            prompt=[digit_prompt(labels[i]) for i in chunk],
            generator=[torch.Generator().manual_seed(int(seeds[i])) for i in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=DIGITS_IMAGE_SIZE,
            width=DIGITS_IMAGE_SIZE,
            output_type="pt",
            **call_kwargs,
        ).images
        chunks.append((images * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def frechet_distance(net: DigitsFeatureNet, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID-digits: torchmetrics' FID with the digits feature network in place of Inception."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # optional dependency

    metric = FrechetInceptionDistance(feature=net)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def evaluate_digits(
    pipe: StableDiffusionPipeline,
    net: DigitsFeatureNet,
    *,
    n: int = 1000,
    num_inference_steps: int = 50,
    guidance_scale: float = DIGITS_GUIDANCE_SCALE,
    batch_size: int = 250,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """The quality bar: FID of generated digits between a real-vs-real floor and noise.

    Prompts cycle through the ten digits, seeds are 0..n-1. The model passes when it closes
    at least 90 % of the gap from noise to the floor and the classifier recognises the
    prompted digit in at least 80 % of the images.
    """
    train_images, _, held_images, held_labels = digits_split(seed=0)
    labels = [i % 10 for i in range(n)]
    started = time.perf_counter()
    generated = generate_digits(
        pipe, labels, range(n), num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, batch_size=batch_size, **call_kwargs,
    )
    seconds = time.perf_counter() - started
    noise = torch.randint(0, 256, generated.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floor = frechet_distance(net, train_images, held_images)
    model = frechet_distance(net, train_images, generated)
    noise_fid = frechet_distance(net, train_images, noise)
    adherence = (net.classify(generated) == torch.tensor(labels)).float().mean().item()
    return {
        "n": n,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "fid_floor": floor,
        "fid_model": model,
        "fid_noise": noise_fid,
        "fid_bar": floor + (noise_fid - floor) / 10,
        "adherence": adherence,
        "heldout_accuracy": (net.classify(held_images) == held_labels).float().mean().item(),
        "passes": model - floor <= (noise_fid - floor) / 10 and adherence >= 0.8,
        "generation_seconds": seconds,
    }


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.models.train", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits", help="train the digits text-to-image pipeline")
    digits.add_argument("--out", type=Path, default=DIGITS_PIPELINE_DIR)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--steps", type=int, default=DEFAULT_DIGITS_STEPS, help="UNet training steps")
    digits.add_argument("--vae-steps", type=int, default=DEFAULT_VAE_STEPS)
    sd3 = commands.add_parser("digits-sd3", help="train the digits SD3 (MMDiT, flow matching) pipeline")
    sd3.add_argument("--out", type=Path, default=None, help="default: the package's weights/digits-sd3")
    sd3.add_argument("--seed", type=int, default=0)
    sd3.add_argument("--steps", type=int, default=DEFAULT_DIGITS_SD3_STEPS, help="transformer training steps")
    sd3.add_argument("--batch-size", type=int, default=128)
    sd3.add_argument("--lr", type=float, default=1e-3)
    features = commands.add_parser("features", help="train the FID-digits feature network")
    features.add_argument("--out", type=Path, default=DIGITS_FEATURES_FILE)
    features.add_argument("--seed", type=int, default=0)
    features.add_argument("--steps", type=int, default=DEFAULT_FEATURE_STEPS)
    evaluate = commands.add_parser("evaluate", help="measure FID-digits and prompt adherence")
    evaluate.add_argument("--model", type=Path, default=DIGITS_PIPELINE_DIR)
    evaluate.add_argument("--features", type=Path, default=DIGITS_FEATURES_FILE)
    evaluate.add_argument("--n", type=int, default=1000)
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--guidance-scale", type=float, nargs="+", default=[DIGITS_GUIDANCE_SCALE])
    evaluate.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def _load_any_digits(path: Path) -> tuple[Any, dict[str, Any]]:
    """Either digits model (the SD UNet, or the SD3 transformer) and what its calls must pass."""
    index = path / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline":
        from .digits_mmdit import DIGITS_SD3_CALL, load_digits_sd3_pipeline

        return load_digits_sd3_pipeline(path), dict(DIGITS_SD3_CALL)
    return load_digits_pipeline(path), {}


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    exit_if_check_only("python -m fastdiff.models.train")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    if args.command == "digits":
        train_digits(args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps, log=_log)
    elif args.command == "digits-sd3":
        from .digits_mmdit import DIGITS_SD3_PIPELINE_DIR

        train_digits_sd3(args.out or DIGITS_SD3_PIPELINE_DIR, seed=args.seed, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, log=_log)
    elif args.command == "features":
        train_feature_network(args.out, seed=args.seed, steps=args.steps, log=_log)
    else:
        pipe, call = _load_any_digits(args.model)
        net = load_feature_network(args.features)
        results = [
            evaluate_digits(pipe, net, n=args.n, num_inference_steps=args.steps, guidance_scale=scale, **call)
            for scale in args.guidance_scale
        ]
        for result in results:
            _log(json.dumps(result))
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"{args.command}: {time.perf_counter() - started:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
