"""A self-supervised pretraining stage for a vision backbone trained from scratch: per-patch colour targets.

OpenVLA starts from pretrained vision towers; a model trained from scratch has none. Before VLA training,
`pretrain_vision` trains the vision backbone and the projector to map each image patch to a fixed random projection of
its colour content plus the 2-D sine-cosine embedding of its position. The colour content (`patch_colour_shares`) is
computed from the pixels alone: for each of `HUE_BINS` hue sectors, the patch's mean chroma (max minus min of R, G, B)
over the pixels of that hue, and the patch's share of dark pixels. Grey and white pixels have no chroma, so an empty
patch of a grey table maps to its position only, and each colour is one direction of the image tokens, at a larger
scale than the position's.

The decoder then learns which object an instruction names in minutes (README, main job): colour words match image
tokens whose colour is one fixed direction, where a vision path learned from scratch with the action loss alone keeps
where things are and loses their colour.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_openvla import OpenVLAForActionPrediction, sincos_2d_positions

logger = logging.getLogger(__name__)
HUE_BINS = 12
DARK_LEVEL = 1 / 3  # a pixel whose brightest channel is below this share of full scale counts as dark
COLOUR_CHANNELS = HUE_BINS + 1
TARGET_SCALE = 3.0  # std of the colour projection's entries; the position embedding's entries lie in [-1, 1]


def patch_colour_shares(rgb: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Colour content of each patch of images in [0, 1]: `[batch, 3, H, W]` -> `[batch, num_patches, HUE_BINS + 1]`.

    Channel k < `HUE_BINS` is the mean over the patch of each pixel's chroma if its hue falls in sector k (sectors
    centred on 0, 30, ... 330 degrees; red is sector 0), else 0; the last channel is the share of dark pixels.
    Patches are in row-major order, as the vision backbone's.
    """
    brightest, darkest = rgb.amax(1), rgb.amin(1)
    chroma = brightest - darkest
    red, green, blue = rgb.unbind(1)
    safe_chroma = chroma.clamp_min(1e-6)
    hue = torch.where(
        brightest == red,
        ((green - blue) / safe_chroma) % 6,
        torch.where(brightest == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )  # in sixths of a turn, [0, 6)
    sector = (hue * (HUE_BINS / 6) + 0.5).floor().long() % HUE_BINS
    hue_chroma = F.one_hot(sector, HUE_BINS).permute(0, 3, 1, 2) * chroma.unsqueeze(1)
    dark = (brightest < DARK_LEVEL).unsqueeze(1).to(rgb.dtype)
    shares = F.avg_pool2d(torch.cat([hue_chroma.to(rgb.dtype), dark], dim=1), patch_size)
    return shares.flatten(2).transpose(1, 2)


class PatchColourTarget:
    """The pretraining target of the projected patch features: `[batch, 3, H, W]` normalised pixel values ->
    `[batch, num_patches, hidden_dim]`, `patch_colour_shares @ projection + position embeddings`.

    `image_mean` / `image_std` undo the image processor's normalisation; the projection is drawn from `seed`.
    """

    def __init__(self, model: OpenVLAForActionPrediction, image_mean, image_std, seed: int = 0):
        config = model.config
        if config.fused_vision_config is not None:
            raise ValueError("Vision pretraining supports a single vision backbone (3 channels), not a fused one.")
        self.patch_size = config.patch_size
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(COLOUR_CHANNELS, config.hidden_dim, generator=generator) * TARGET_SCALE
        self.positions = sincos_2d_positions(config.image_size // config.patch_size, config.hidden_dim)
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rgb = (pixel_values.float().cpu() * self.std + self.mean).clamp(0, 1)
        return patch_colour_shares(rgb, self.patch_size) @ self.projection + self.positions


def pretrain_vision(
    model: OpenVLAForActionPrediction,
    batches,
    target: PatchColourTarget,
    steps: int,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> list[float]:
    """Train `model.vision_backbone` and `model.projector` for `steps` steps (AdamW) so that
    `model.get_image_features(pixel_values)` regresses `target(pixel_values)`; the loss is the mean squared error
    relative to the target's mean square. `batches` (e.g. a `DataLoader` with the processor's collator) yields
    batches with `pixel_values` `[batch, C, H, W]`, and is iterated again when it runs out.

    Returns the loss of every step.
    """
    parameters = [*model.vision_backbone.parameters(), *model.projector.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses: list[float] = []
    iterator = iter(())
    for _ in tqdm(range(steps), desc="vision pretraining", disable=not progress):
        batch = next(iterator, None)
        if batch is None:
            iterator = iter(batches)
            batch = next(iterator)
        pixel_values = batch["pixel_values"]
        goal = target(pixel_values).to(device)
        features = model.get_image_features(pixel_values.to(device))
        loss = F.mse_loss(features.float(), goal) / goal.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.train(was_training)
    logger.info("Vision pretraining: relative error %.4f after %d steps (%.4f at the first).", np.mean(losses[-10:]), steps, losses[0])
    return losses
