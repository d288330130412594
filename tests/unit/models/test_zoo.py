"""The GPU benchmark's reference architectures, small, through the real loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_gpu
from pipeline.models import ModelRegistry, zoo

TINY_BERT = bench_gpu.CPU.bert


def test_bert_padding_mask_leaves_real_tokens_unchanged() -> None:
    torch.manual_seed(0)
    model = zoo.BertEncoder(**TINY_BERT).eval()
    ids = torch.randint(0, TINY_BERT["vocab_size"], (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.inference_mode():
        alone = model(ids)
        masked = model(padded, mask)
        unmasked = model(padded)
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, alone, rtol=1e-4, atol=1e-5)  # the mask matters


def test_resnet_takes_uint8_images_and_resizes_them() -> None:
    torch.manual_seed(0)
    model = zoo.ResNet(layers=[1, 1], width=4, num_classes=7, image_size=24)
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    zoo.calibrate_batch_norm(model, images)
    assert not model.training
    with torch.inference_mode():
        out = model(images)
    assert out.shape == (4, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Calibrated batch norm: the logits are of ordinary size, not blown up by the depth.
    assert out.abs().max() < 100


def test_built_models_load_through_the_registry(tmp_path: Path) -> None:
    names = bench_gpu.build_models(tmp_path, bench_gpu.CPU, torch.device("cpu"))
    registry = ModelRegistry(tmp_path, torch.device("cpu"))
    assert sorted(registry.names) == sorted(names)
    rng = np.random.default_rng(0)
    for name in names:
        loaded = registry.resolve(name)
        assert loaded.config.format == "safetensors"
        batch = [
            bench_gpu.bench.random_input(rng, spec, loaded.config.arch_config, 3)
            for spec in loaded.config.inputs
        ]
        (out,) = loaded.run(batch)
        assert out.shape[0] == 3 and np.isfinite(out).all()
    assert bench_gpu.bare_rps(registry, "bert", batch=4, seconds=0.05) > 0


def test_resnet_on_normalised_input_matches_it_on_pixels() -> None:
    torch.manual_seed(0)
    pixels_model = zoo.ResNet(layers=[1, 1], width=4, num_classes=5, image_size=16)
    normalised_model = zoo.ResNet(
        layers=[1, 1], width=4, num_classes=5, image_size=16, normalized_input=True
    )
    normalised_model.load_state_dict(pixels_model.state_dict())
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    zoo.calibrate_batch_norm(pixels_model, images)
    normalised_model.load_state_dict(pixels_model.state_dict())
    normalised_model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = pixels_model(images)
        got = normalised_model((images.float() / 255 - mean) / std)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
