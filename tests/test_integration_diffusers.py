"""diffusers: the attention processor on a tiny random UNet2DConditionModel
(self- and cross-attention, encoder attention mask) and patch_sdpa() on a tiny
FluxTransformer2DModel, against diffusers' default processors in float32."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad

diffusers = pytest.importorskip("diffusers")
add = pytest.importorskip("attention_dispatch.integrations.diffusers")


def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    ctx = torch.randn(2, 7, 32, generator=g)
    keep = torch.ones(2, 7)
    keep[1, 4:] = 0  # the second prompt has 4 real tokens
    return x, torch.tensor([10, 500]), ctx, keep


def flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8))


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(2, 16, 4, generator=g, requires_grad=True),
                encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g),
                timestep=torch.tensor([0.5, 0.2]), img_ids=img_ids, txt_ids=torch.zeros(6, 3))


def _grads(model, out, inputs):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(out, inputs + params, g)


@pytest.mark.parametrize("with_mask", [False, True])
def test_unet_processor_matches_default(with_mask):
    ref_model, model = unet(), unet()
    model.set_attn_processor(add.AttentionDispatchProcessor())
    x, t, ctx, keep = unet_inputs()
    mask = keep if with_mask else None
    ref = ref_model(x, t, ctx, encoder_attention_mask=mask).sample
    ad.clear_events()
    out = model(x, t, ctx, encoder_attention_mask=mask).sample
    kinds = {e.spec.mask_kind for e in ad.events("decision")}
    assert kinds == ({"none", "float"} if with_mask else {"none"})  # ours ran, self + cross
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    for a, b in zip(_grads(model, out, [x]), _grads(ref_model, ref, [x])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    if with_mask:  # the mask matters: without it the output differs
        assert (model(x, t, ctx).sample - out).abs().max() > 1e-3


def test_processor_takes_bool_masks_as_key_padding():
    """A bool (B, Sk) mask reaches the kernels as key padding; the result
    equals the default processor with the same mask."""
    torch.manual_seed(0)
    attn = diffusers.models.attention_processor.Attention(query_dim=32, cross_attention_dim=16,
                                                         heads=4, dim_head=8)
    h, ctx = torch.randn(2, 5, 32), torch.randn(2, 6, 16)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 3:] = False
    ref = attn(h, ctx, attention_mask=keep[:, None, :])
    attn.set_processor(add.AttentionDispatchProcessor())
    ad.clear_events()
    out = attn(h, ctx, attention_mask=keep)
    spec = ad.events("decision")[-1].spec
    assert spec.key_padding and spec.mask_kind == "none"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_processor_selection_and_refusals(spy_backend):
    model = unet()
    model.set_attn_processor(add.AttentionDispatchProcessor(backend="spy"))
    x, t, ctx, _ = unet_inputs()
    with torch.no_grad():
        model(x, t, ctx)
    modules = [m for m in model.modules()
               if isinstance(m, diffusers.models.attention_processor.Attention)]
    assert len(spy_backend.calls) == len(modules) == 8  # 4 blocks x (self, cross)
    f = flux()
    f.set_attn_processor(add.AttentionDispatchProcessor())
    with pytest.raises(ad.AttentionTypeError, match="patch_sdpa"):
        f(**flux_inputs())


def test_flux_transformer_under_patch_sdpa_matches_default():
    """Flux's processors go through diffusers' dispatch_attention_fn, whose
    native backend calls torch's SDPA: patch_sdpa() routes them."""
    model = flux()
    inputs = flux_inputs()
    ref = model(**inputs).sample
    ref_grads = _grads(model, ref, [inputs["hidden_states"]])
    ad.clear_events()
    with ad.patch_sdpa():
        out = model(**inputs).sample
        grads = _grads(model, out, [inputs["hidden_states"]])
    assert ad.events("decision")  # ours ran
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_no_backend_registration_point():
    """diffusers' backend registry is keyed by a closed Enum: a new name is
    rejected, which is why this integration is a processor and a patch."""
    from diffusers.models.attention_dispatch import attention_backend

    with pytest.raises(ValueError):
        with attention_backend("attention_dispatch"):
            pass
