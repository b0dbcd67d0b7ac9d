"""openvla_tools.vision_pretraining: the per-patch colour targets and the pretraining stage of a model built from scratch."""

import numpy as np
import pytest
import torch
from conftest import make_model, make_processor
from PIL import Image

from openvla_tools.envs.tabletop import TabletopEnv
from openvla_tools.vision_pretraining import HUE_BINS, PatchColourTarget, patch_colour_shares, pretrain_vision


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """`[H, W, 3]` uint8 -> `[1, 3, H, W]` in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def test_each_patch_holds_the_chroma_of_its_hue_sector_and_its_dark_share():
    pixels = np.full((16, 24, 3), 200, dtype=np.uint8)  # a grey table, 2 rows x 3 columns of 8 px patches
    pixels[:8, :4] = (255, 0, 0)  # half of patch (0, 0) pure red
    pixels[:8, 8:16] = (0, 0, 255)  # all of patch (0, 1) pure blue
    pixels[8:, 16:] = (10, 10, 10)  # all of patch (1, 2) black
    pixels[8:, :8] = (128, 255, 128)  # patch (1, 0) light green: chroma 127 / 255
    shares = patch_colour_shares(image_tensor(pixels), patch_size=8)[0]
    assert shares.shape == (6, HUE_BINS + 1)
    expected = torch.zeros(6, HUE_BINS + 1)
    expected[0, 0] = 0.5  # red: sector 0, chroma 1 over half the patch
    expected[1, 8] = 1.0  # blue: 240 degrees, sector 8
    expected[3, 4] = 127 / 255  # green: 120 degrees, sector 4
    expected[5, HUE_BINS] = 1.0  # dark
    torch.testing.assert_close(shares, expected)


@pytest.mark.parametrize(("rgb", "sector"), [((255, 255, 0), 2), ((0, 255, 255), 6), ((255, 0, 255), 10), ((255, 64, 0), 1)])
def test_hue_sectors_are_thirty_degrees_wide_and_centred_on_multiples_of_thirty(rgb, sector):
    shares = patch_colour_shares(image_tensor(np.full((4, 4, 3), rgb, dtype=np.uint8)), patch_size=4)[0, 0]
    assert int(shares[:HUE_BINS].argmax()) == sector and float(shares[:HUE_BINS].sum()) == pytest.approx(1.0)


def test_tabletop_objects_of_different_colours_fall_in_different_sectors():
    env = TabletopEnv(num_objects=4)
    env.reset(0)
    image = np.asarray(env.render())
    sectors = set()
    for obj in env.objects:
        x, y = (np.array([obj.position[0], 1 - obj.position[1]]) * image.shape[0]).astype(int)
        patch = image[y - 2 : y + 2, x - 2 : x + 2]
        sectors.add(int(patch_colour_shares(image_tensor(np.ascontiguousarray(patch)), patch_size=4)[0, 0, :HUE_BINS].argmax()))
    assert len(sectors) == 4


def test_the_target_is_the_projected_shares_plus_the_patch_positions(tokenizer):
    model = make_model(tokenizer)
    processor = make_processor(tokenizer)
    image_processor = processor.image_processor
    target = PatchColourTarget(model, image_processor.image_mean, image_processor.image_std)
    grey = image_processor(Image.new("RGB", (56, 56), (200, 200, 200)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(target(grey)[0], target.positions, atol=1e-5, rtol=0)  # no colour, no dark pixels
    assert target(grey).shape == (1, model.config.num_patches, model.config.hidden_dim)
    again = PatchColourTarget(model, image_processor.image_mean, image_processor.image_std)
    torch.testing.assert_close(target.projection, again.projection)


def test_pretraining_lowers_the_error_and_changes_only_the_vision_backbone_and_projector(tokenizer, single_thread):
    model = make_model(tokenizer).train()
    processor = make_processor(tokenizer)
    image_processor = processor.image_processor
    envs = [TabletopEnv(image_size=56) for _ in range(16)]
    for seed, env in enumerate(envs):
        env.reset(seed)
    batches = [{"pixel_values": image_processor([env.render() for env in envs[i : i + 8]], return_tensors="pt")["pixel_values"]} for i in (0, 8)]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    target = PatchColourTarget(model, image_processor.image_mean, image_processor.image_std)
    losses = pretrain_vision(model, batches, target, steps=60, progress=False)
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.5 * losses[0]
    changed = {name.split(".")[0] for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == {"vision_backbone", "projector"}
    assert model.training


def test_a_fused_backbone_is_refused(tokenizer):
    model = make_model(tokenizer)
    model.config.fused_vision_config = model.config.vision_config
    with pytest.raises(ValueError, match="single vision backbone"):
        PatchColourTarget(model, [0.5] * 3, [0.5] * 3)
