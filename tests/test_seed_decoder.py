"""SEED's pixel decoder (frugalvision.language.seed_decoder): unCLIP-style conditioning, guidance, training step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from frugalvision.errors import ConfigError, DataError
from frugalvision.inspect.text_diffusion import TextDiffusionConfig
from frugalvision.language.seed_decoder import SEEDPixelDecoder, fit_pixel_decoder

CFG = TextDiffusionConfig(image_size=8, channels=(8, 16, 16), heads=2, timesteps=50)


def dec(**kw) -> SEEDPixelDecoder:
    torch.manual_seed(0)
    return SEEDPixelDecoder(6, CFG, **kw).eval()


def test_the_embedding_conditions_both_the_timestep_and_the_cross_attention():
    d = dec()
    assert d.unet.config.class_embed_type == "projection"
    assert d.unet.config.projection_class_embeddings_input_dim == 6 and d.unet.config.cross_attention_dim == 6
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    cond = d.norm(torch.randn(2, 6))
    with torch.no_grad():
        base = d(x, t, cond)
        assert not torch.allclose(base, d(x, t, d.norm(torch.randn(2, 6))))
        # what the projection path alone adds: the same UNet call with another class embedding only
        other = d.unet(x, t, encoder_hidden_states=cond[:, None], class_labels=d.norm(torch.randn(2, 6))).sample
        assert not torch.allclose(base, other)


def test_guidance_one_is_the_conditional_model_and_sampling_is_repeatable():
    d = dec()
    e = torch.randn(3, 6)
    a = d.sample(e, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(1))
    b = d.sample(e, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(1))
    c = d.sample(e, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b) and not torch.allclose(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_dropout_swaps_in_the_null_embedding():
    d = dec(dropout=0.999)
    x, e = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 6)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    # with every embedding dropped, the loss does not depend on the embeddings
    torch.testing.assert_close(d.loss(x, e, generator=g1), d.loss(x, e * 5 + 1, generator=g2))
    d.train()
    d.loss(x, e, generator=torch.Generator().manual_seed(0)).backward()
    assert d.null.grad is not None and float(d.null.grad.abs().sum()) > 0


def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    d = dec(dropout=0.0)
    imgs, e = torch.rand(4, 3, 8, 8), torch.randn(4, 6)

    def loss() -> float:
        with torch.no_grad():
            return float(d.loss(imgs * 2 - 1, e, generator=torch.Generator().manual_seed(3)))

    before = loss()
    fit_pixel_decoder(d, imgs, e, steps=30, batch_size=4, lr=3e-3, progress=False)
    assert loss() < before


def test_clear_errors():
    d = dec()
    with pytest.raises(DataError, match=r"\(B, 6\)"):
        d.sample(torch.randn(2, 5), steps=1)
    with pytest.raises(DataError, match="paired with"):
        fit_pixel_decoder(d, torch.rand(3, 3, 8, 8), torch.randn(2, 6), steps=1, progress=False)
    with pytest.raises(ConfigError, match="dropout"):
        SEEDPixelDecoder(6, CFG, dropout=1.0)


def test_the_sampler_recovers_the_image_of_an_oracle_noise_predictor():
    """With the exact noise predictor of a one-image dataset, DDIM sampling must return that image."""
    d = dec()
    x0 = torch.zeros(3, 8, 8)
    x0[0], x0[2] = 0.8, -0.6
    ab = d.config.scheduler("ddpm").alphas_cumprod

    def oracle(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    d.forward = oracle
    out = d.sample(torch.randn(2, 6), steps=25, guidance=2.0, generator=torch.Generator().manual_seed(0))
    err = out - (x0 + 1) / 2  # the last DDIM step keeps sqrt(1 - alphas_cumprod[0]) ~ 0.03 of the start noise
    assert float(err.mean((2, 3)).abs().max()) < 0.05 and float(err.abs().max()) < 0.2


# --------------------------------------------------------------------------------------------- Stable unCLIP
@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    pytest.importorskip("transformers")
    from frugalvision.language.seed_decoder import tiny_stable_unclip

    return tiny_stable_unclip(tmp_path_factory.mktemp("unclip") / "pipe", embed_dim=8)


def test_unclip_folder_is_called_as_seed_calls_it(unclip):
    """Our decoder's images equal diffusers' own pipeline, loaded from the same folder, called as SEED does."""
    import diffusers

    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(unclip.source)
    ref.set_progress_bar_config(disable=True)
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    ours = unclip.sample(emb, steps=3, guidance=10.0, generator=torch.Generator().manual_seed(0))
    want = ref(prompt=["", ""], image_embeds=emb, noise_level=0, num_inference_steps=3, guidance_scale=10.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(ours, want.float().clamp(0, 1), rtol=1e-4, atol=1e-5)
    # the embedding conditions the image: another embedding, same noise → another image
    other = unclip.sample(-emb, steps=3, guidance=10.0, generator=torch.Generator().manual_seed(0))
    assert (other - ours).abs().max() > 1e-3
    assert ours.shape == (2, 3, 32, 32) and float(ours.min()) >= 0 and float(ours.max()) <= 1


def test_unclip_errors(unclip, tmp_path):
    from frugalvision.errors import CheckpointError
    from frugalvision.inspect.slime import tiny_stable_diffusion
    from frugalvision.language.seed_decoder import UnCLIPDecoder

    with pytest.raises(DataError, match=r"\(8,\)-wide image embeddings"):
        unclip.sample(torch.zeros(1, 1024), steps=1)
    with pytest.raises(CheckpointError, match=r"no model_index\.json"):
        UnCLIPDecoder.from_pretrained(tmp_path)
    tiny_stable_diffusion(folder=tmp_path / "sd")
    with pytest.raises(CheckpointError, match="holds a StableDiffusionPipeline, not a Stable unCLIP"):
        UnCLIPDecoder.from_pretrained(tmp_path / "sd")
