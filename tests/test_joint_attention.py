"""Joint-image attention (JeDi) on a tiny SD-shaped UNet, in float64 on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dreamblend import AttentionStore, DreamBlendProcessor, attach
from dreamblend.joint import ImageSet, JointAttnProcessor, attach_joint_attention, install_joint_attention
from dreamblend.testing import tiny_sd_components, tiny_sdxl_components

DTYPE = torch.float64


def sd_unet() -> nn.Module:
    return tiny_sd_components(seed=0)["unet"].eval().to(DTYPE)


def unet_inputs(unet: nn.Module, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, 4, size, size, generator=g).to(DTYPE)
    c = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(DTYPE)
    return x, torch.tensor(500), c


def run(unet: nn.Module, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def self_layers(unet: nn.Module) -> list[str]:
    return [n for n in unet.attn_processors if n.endswith("attn1.processor")]


def reference_joint_attention(attn: nn.Module, x: Tensor, n: int) -> Tensor:
    """Concatenate each set's tokens, run plain softmax attention over them, split back per image."""
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0
    assert attn.group_norm is None and attn.spatial_norm is None and attn.norm_q is None
    b, length, _ = x.shape
    heads = attn.heads
    outs = []
    for s in range(b // n):
        tokens = torch.cat([x[s * n + i] for i in range(n)], dim=0)  # (n * L, C)
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        d = q.shape[-1] // heads
        head_outs = []
        for h in range(heads):
            qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
            probs = torch.softmax(qh @ kh.T * d**-0.5, dim=-1)
            head_outs.append(probs @ vh)
        out = attn.to_out[0](torch.cat(head_outs, dim=-1))  # (n * L, C); to_out[1] is dropout (eval)
        outs.extend(out.split(length, dim=0))
    return torch.stack(outs)


class ReferenceJointProcessor:
    """Test-only attn1 processor built on :func:`reference_joint_attention`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert encoder_hidden_states is None and attention_mask is None
        return reference_joint_attention(attn, hidden_states, self.n)


def with_reference_attn1(unet: nn.Module, n: int) -> None:
    procs = dict(unet.attn_processors)
    for name in self_layers(unet):
        procs[name] = ReferenceJointProcessor(n)
    unet.set_attn_processor(procs)


@pytest.mark.parametrize(("batch", "n"), [(4, 2), (6, 3), (6, 2), (4, 4)])
def test_layer_equals_handwritten_reference(batch: int, n: int) -> None:
    unet = sd_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, attn.query_dim, generator=g).to(DTYPE)
    with torch.no_grad():
        out = JointAttnProcessor(ImageSet(n))(attn, x)
        ref = reference_joint_attention(attn, x, n)
        per_image = JointAttnProcessor(ImageSet(1))(attn, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out, per_image)  # the set really is attended jointly


@pytest.mark.parametrize(("batch", "n"), [(4, 2), (6, 3)])
def test_unet_equals_handwritten_reference(batch: int, n: int) -> None:
    unet = sd_unet()
    x, t, c = unet_inputs(unet, batch)
    with attach_joint_attention(unet, ImageSet(n)):
        out = run(unet, x, t, c)
    with_reference_attn1(unet, n)
    ref = run(unet, x, t, c)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_set_of_one_equals_stock_processor_exactly() -> None:
    unet = sd_unet()
    x, t, c = unet_inputs(unet, 3)
    stock = run(unet, x, t, c)
    with attach_joint_attention(unet, ImageSet(1)) as image_set:
        assert image_set.size == 1
        assert all(isinstance(p, JointAttnProcessor) for n, p in unet.attn_processors.items() if "attn1" in n)
        out = run(unet, x, t, c)
    assert torch.equal(out, stock)


def test_only_attn1_is_replaced_and_restored() -> None:
    unet = sd_unet()
    before = dict(unet.attn_processors)
    image_set = ImageSet(2)
    with attach_joint_attention(unet, image_set):
        during = unet.attn_processors
        for name, proc in during.items():
            if name.endswith("attn1.processor"):
                assert isinstance(proc, JointAttnProcessor) and proc.processor is before[name]
                assert proc.image_set is image_set
            else:
                assert name.endswith("attn2.processor") and proc is before[name]
        install_joint_attention(unet, ImageSet(3))  # re-installing re-wraps, never nests
        assert all(
            p.processor is before[n] and p.image_set.size == 3
            for n, p in unet.attn_processors.items()
            if n.endswith("attn1.processor")
        )
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_cfg_halves_do_not_mix() -> None:
    """With B = 2 * n * k, sets are contiguous runs inside each half: the cond half ignores the uncond one."""
    unet = sd_unet()
    n, k = 2, 2
    x, t, c = unet_inputs(unet, 2 * n * k)
    half = n * k
    x2 = x.clone()
    x2[:half] = torch.randn(half, *x.shape[1:], generator=torch.Generator().manual_seed(7)).to(DTYPE)
    image_set = ImageSet(n)
    with attach_joint_attention(unet, image_set):
        out = run(unet, x, t, c)
        perturbed = run(unet, x2, t, c)
        cond_alone = run(unet, x[half:], t, c[half:])
        torch.testing.assert_close(perturbed[half:], out[half:], rtol=0, atol=1e-12)
        torch.testing.assert_close(cond_alone, out[half:], rtol=0, atol=1e-12)
        # Each set alone gives the same rows as inside the batch.
        for s in range(2 * k):
            rows = slice(s * n, (s + 1) * n)
            torch.testing.assert_close(run(unet, x[rows], t, c[rows]), out[rows], rtol=0, atol=1e-12)
        # Contrast: a set spanning both halves does mix them.
        with image_set.joint(2 * n * k):
            mixed, mixed_perturbed = run(unet, x, t, c), run(unet, x2, t, c)
        assert image_set.size == n
    assert not torch.allclose(mixed_perturbed[half:], mixed[half:])


def test_composes_with_dreamblend_capture_on_attn2() -> None:
    unet = sd_unet()
    n, batch = 2, 4
    x, t, c = unet_inputs(unet, batch)
    cross = [name for name, m in unet.named_modules() if name.endswith("attn2")]
    with attach_joint_attention(unet, ImageSet(n)):
        plain_joint = run(unet, x, t, c)
    with attach(unet, AttentionStore()) as store, attach_joint_attention(unet, ImageSet(n)):
        for name, proc in unet.attn_processors.items():
            if name.endswith("attn1.processor"):
                assert isinstance(proc, JointAttnProcessor) and isinstance(
                    proc.processor, DreamBlendProcessor
                )
            else:
                assert isinstance(proc, DreamBlendProcessor)
        with store.record():
            out = run(unet, x, t, c)
        maps = dict(store.maps)
    assert set(maps) == set(cross)
    assert all(m.shape[0] == batch for m in maps.values())
    torch.testing.assert_close(out, plain_joint, rtol=0, atol=1e-12)  # capturing never changes the result

    # The captured maps are those of the reference joint model (attn1 hand-written, attn2 captured).
    with attach(unet, AttentionStore()) as ref_store:
        with_reference_attn1(unet, n)
        with ref_store.record():
            ref_out = run(unet, x, t, c)
        ref_maps = dict(ref_store.maps)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name in cross:
        torch.testing.assert_close(maps[name].to(DTYPE), ref_maps[name].to(DTYPE), rtol=0, atol=1e-6)

    # Without joint attention the maps differ: the capture really saw the joint model.
    with attach(unet, AttentionStore()) as solo_store, solo_store.record():
        run(unet, x, t, c)
    assert any(not torch.allclose(maps[name], solo_store.maps[name]) for name in cross)


def test_batch_not_multiple_of_set_size_is_a_clear_error() -> None:
    unet = sd_unet()
    x, t, c = unet_inputs(unet, 3)
    with (
        attach_joint_attention(unet, ImageSet(2)),
        pytest.raises(ValueError, match=r"batch size 3 .* set size 2"),
    ):
        run(unet, x, t, c)
    with pytest.raises(ValueError, match="batch size 5 is not a multiple of the image set size 4"):
        ImageSet(4).num_sets(5)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_set_size(size) -> None:
    with pytest.raises(ValueError, match="positive int"):
        ImageSet(size)


def test_cross_attention_input_and_non_diffusers_model_are_errors() -> None:
    unet = sd_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x = torch.zeros(2, 16, attn.query_dim, dtype=DTYPE)
    ctx = torch.zeros(2, 7, unet.config.cross_attention_dim, dtype=DTYPE)
    with pytest.raises(ValueError, match="self-attention"):
        JointAttnProcessor(ImageSet(2))(attn, x, ctx)
    with pytest.raises(TypeError, match="diffusers model"), attach_joint_attention(nn.Linear(2, 2)):
        pass


def test_gradients_match_reference() -> None:
    """Training backpropagates through the joint view: gradients equal the reference model's."""
    unet = sd_unet()
    x, t, c = unet_inputs(unet, 4)
    grads = []
    for joint in (True, False):
        xi = x.clone().requires_grad_(True)
        if joint:
            with attach_joint_attention(unet, ImageSet(2)):
                unet(xi, t, encoder_hidden_states=c).sample.square().sum().backward()
        else:
            with_reference_attn1(unet, 2)
            unet(xi, t, encoder_hidden_states=c).sample.square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


def test_sdxl_unet_equals_reference() -> None:
    unet = tiny_sdxl_components(seed=0)["unet"].eval().to(DTYPE)
    batch, n = 4, 2
    x, t, c = unet_inputs(unet, batch)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    g = torch.Generator().manual_seed(3)
    added = {
        "text_embeds": torch.randn(batch, pooled, generator=g).to(DTYPE),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch).to(DTYPE),
    }
    with torch.no_grad():
        with attach_joint_attention(unet, ImageSet(n)):
            out = unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added).sample
        with_reference_attn1(unet, n)
        ref = unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
