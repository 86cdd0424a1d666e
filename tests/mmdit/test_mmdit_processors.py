"""SD3 and FLUX DreamBlend processors on tiny transformers: drop-in, maps, guidance gradients."""

from __future__ import annotations

import pytest
import torch
from mmdit_helpers import (
    CASES,
    N_TEXT,
    eager_latent_grad,
    image_text_maps,
    joint_layers,
    run,
    stock_probs,
)

from dreamblend import AttentionStore
from dreamblend.mmdit import FluxDreamBlendProcessor, SD3DreamBlendProcessor, attach
from dreamblend.testing import tiny_clip_tokenizer

# A probability (<= 1) rounded to float32 moves by at most half an ulp of 1, 6e-8: maps that may be
# returned in float32 from float64 inputs are compared at 1e-7.
MAP_ATOL = 1e-7


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def processor_of(case):
    return {"sd3": SD3DreamBlendProcessor, "flux": FluxDreamBlendProcessor}[case.name]


# ---------------------------------------------------------------------------------------- drop-in


@torch.no_grad()
def test_off_equals_stock_processor(case):
    model = case.build()
    inputs = case.inputs(model)
    model.set_attn_processor(case.stock())
    expected = run(model, inputs)
    store = AttentionStore()
    for processor in (processor_of(case)(store), processor_of(case)()):
        model.set_attn_processor(processor)
        torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)  # the same arithmetic
    with attach(model, store), store.record():  # capture changes the arithmetic path, not the result
        torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-5)
    assert set(store.maps) == set(joint_layers(model))


def test_attach_picks_the_processor_and_restores_the_previous_ones(case):
    model = case.build()
    before = {name: type(p) for name, p in model.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"), attach(model):
        assert {type(p) for p in model.attn_processors.values()} == {processor_of(case)}
        raise RuntimeError("boom")
    assert {name: type(p) for name, p in model.attn_processors.items()} == before


def test_attach_rejects_other_models():
    from dreamblend.testing import tiny_sd_components

    with pytest.raises(TypeError, match="no MMDiT DreamBlend processor for UNet2DConditionModel"):
        with attach(tiny_sd_components(seed=0)["unet"]):
            pass


# ---------------------------------------------------------------------------------------- maps


@torch.no_grad()
def test_recorded_maps_equal_softmax_over_concatenated_keys(case):
    model = case.build().double()
    inputs = case.inputs(model, dtype=torch.float64)
    expected = {name: image_text_maps(case, p) for name, p in stock_probs(case, model, inputs).items()}
    assert set(expected) == set(joint_layers(model)) and len(expected) >= 2
    store = AttentionStore(backend="torch")
    with attach(model, store), store.record():
        run(model, inputs)
    assert set(store.maps) == set(expected)
    num_image = 16  # FLUX: 4x4 packed tokens; SD3: 8x8 latent in 2x2 patches
    for name, maps in expected.items():
        assert maps.shape == (2, 4 if case.name == "sd3" else 2, num_image, N_TEXT)
        torch.testing.assert_close(store.maps[name].double(), maps, rtol=0, atol=MAP_ATOL)

    tokens = [1, 3, -1]
    mean_store = AttentionStore(tokens=tokens, head_mean=True, backend="torch")
    with attach(model, mean_store), mean_store.record():
        run(model, inputs)
    for name, maps in expected.items():
        torch.testing.assert_close(
            mean_store.maps[name].double(), maps[..., [1, 3, N_TEXT - 1]].mean(1), rtol=0, atol=MAP_ATOL
        )


@torch.no_grad()
def test_tokens_chosen_by_word(case):
    """Words resolve to positions within the text block (SD3's CLIP tokens lead its text sequence)."""
    model = case.build().double()
    inputs = case.inputs(model, dtype=torch.float64)
    tokenizer = tiny_clip_tokenizer()
    prompt = "a photo of sks dog"
    positions = tokenizer(prompt).input_ids.index(tokenizer.convert_tokens_to_ids("dog</w>"))
    assert positions < N_TEXT
    expected = {name: image_text_maps(case, p) for name, p in stock_probs(case, model, inputs).items()}
    store = AttentionStore(tokens=["dog"], backend="torch").resolve_words(tokenizer, prompt)
    with attach(model, store), store.record():
        run(model, inputs)
    for name, maps in expected.items():
        torch.testing.assert_close(store.maps[name].double(), maps[..., [positions]], rtol=0, atol=MAP_ATOL)


@torch.no_grad()
def test_rows_capture_a_batch_slice_and_keep_outputs(case):
    model = case.build()
    inputs = case.inputs(model, batch=4)
    with attach(model, AttentionStore()) as store:
        with store.record():
            full_out = run(model, inputs)
        full = dict(store.maps)
        with store.record(rows=slice(2, 4)):  # the conditional half of a CFG batch
            half_out = run(model, inputs)
    torch.testing.assert_close(half_out, full_out, rtol=0, atol=1e-5)
    for name, maps in full.items():
        torch.testing.assert_close(store.maps[name], maps[2:4], rtol=0, atol=1e-6)


@torch.no_grad()
def test_layer_selection_by_pattern_and_resolution():
    case = CASES["flux"]
    model = case.build()
    inputs = case.inputs(model)
    with attach(model, AttentionStore(layers=["single_transformer_blocks.*"])) as store, store.record():
        run(model, inputs)
    assert sorted(store.maps) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    with attach(model, AttentionStore(layers=[4])) as store, store.record():  # 4x4 image tokens
        run(model, inputs)
    assert set(store.maps) == set(joint_layers(model))
    with pytest.raises(ValueError, match="matches no text-attention layer.*single_transformer_blocks"):
        with attach(model, AttentionStore(layers=["single_blocks.*"])):
            pass


def test_image_only_attention_is_not_a_map_layer():
    model = CASES["sd3"].build()
    assert "transformer_blocks.0.attn2" not in joint_layers(model)
    with pytest.raises(ValueError, match="self-attention layer.*joint text-image attention layers only"):
        with attach(model, AttentionStore(layers=["*.attn2"])):
            pass


# ---------------------------------------------------------------------------------------- guidance


def perturbed_ref(case, model, inputs):
    """Reference maps from a different latent, so the L1 has a real gradient."""
    store = AttentionStore(backend="torch")
    latent = inputs[case.latent]
    with attach(model, store), torch.no_grad(), store.record():
        run(model, {**inputs, case.latent: latent.flip(1) + 0.3})
    return store.maps


def guided_latent_grad(case, model, inputs, ref, store):
    latent = inputs[case.latent].clone().requires_grad_()
    with attach(model, store), store.guide(ref):
        run(model, {**inputs, case.latent: latent})
        (grad,) = torch.autograd.grad(store.loss.sum(), latent)
    return store.loss.detach(), grad


def test_latent_gradient_equals_fp64_eager_autograd(case):
    model = case.build().double()
    inputs = case.inputs(model, dtype=torch.float64)
    ref = perturbed_ref(case, model, inputs)
    loss_e, grad_e = eager_latent_grad(case, model, inputs, ref)
    loss, grad = guided_latent_grad(case, model, inputs, ref, AttentionStore(backend="torch"))
    assert loss.shape == (2,) and grad.abs().max() > 0
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, grad_e, rtol=1e-8, atol=1e-10)


def test_float32_guidance_matches_fp64_eager(case):
    model = case.build()
    inputs = case.inputs(model)
    ref = perturbed_ref(case, model, inputs)
    loss, grad = guided_latent_grad(case, model, inputs, ref, AttentionStore())
    model64 = model.double()
    inputs64 = case.inputs(model64, dtype=torch.float64)
    loss_e, grad_e = eager_latent_grad(case, model64, inputs64, {k: v.double() for k, v in ref.items()})
    # float32 forward through a few layers: maps carry ~1e-6 relative error, summed over
    # (layers x image x text) ~ 1e3 terms of an L1 near 10; an L1 sign can flip at a near-tie, which
    # moves single gradient entries, so the gradient is held to a scale-relative bound.
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), grad_e, rtol=1e-3, atol=1e-3 * grad_e.abs().max().item())


def test_gradient_checkpointing_does_not_double_capture(case):
    model = case.build()
    inputs = case.inputs(model)
    ref = perturbed_ref(case, model, inputs)
    store = AttentionStore()
    loss, grad = guided_latent_grad(case, model, inputs, ref, store)
    model.enable_gradient_checkpointing()
    model.train()
    ck_store = AttentionStore()
    ck_loss, ck_grad = guided_latent_grad(case, model, inputs, ref, ck_store)
    assert list(ck_store.losses) == list(store.losses)
    torch.testing.assert_close(ck_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ck_grad, grad, rtol=1e-5, atol=1e-7)


def test_triton_backend_gives_the_reference_gradient_under_checkpointing(case):
    """The fused joint kernels (interpreted on CPU) through a whole model, checkpointed forwards re-run."""
    from dreamblend import ops

    if "triton" not in ops.available_backends():
        pytest.skip("triton backend unavailable")
    model = case.build()
    inputs = case.inputs(model)
    ref = perturbed_ref(case, model, inputs)
    loss, grad = guided_latent_grad(case, model, inputs, ref, AttentionStore(backend="torch"))
    model.enable_gradient_checkpointing()
    model.train()
    t_loss, t_grad = guided_latent_grad(case, model, inputs, ref, AttentionStore(backend="triton"))
    # Same float32 math in another summation order: maps agree to ~1e-7, an L1 of a few hundred
    # terms to ~1e-5; an L1 sign flipping at a near-tie would move single gradient entries.
    torch.testing.assert_close(t_loss, loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t_grad, grad, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_recording_traces_fullgraph_under_torch_compile(case):
    """Dynamo traces a recording pass whole (FLUX's text length handed to single-stream layers included).

    Guiding is not traced here: the torch reference op differentiates inside its autograd.Function.
    """
    model = case.build()
    inputs = case.inputs(model)
    store = AttentionStore(backend="torch")
    with attach(model, store):
        with store.record():
            run(model, inputs)
        eager = dict(store.maps)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with store.record():
            compiled(**inputs, return_dict=False)
    assert set(store.maps) == set(eager)
    for name, maps in eager.items():
        torch.testing.assert_close(store.maps[name], maps, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- errors


@torch.no_grad()
def test_misshapen_reference_names_the_layer(case):
    model = case.build()
    inputs = case.inputs(model)
    ref = perturbed_ref(case, model, inputs)
    name = sorted(ref)[0]
    with attach(model, AttentionStore()) as store:
        bad = dict(ref, **{name: ref[name][..., :-1, :]})
        with pytest.raises(ValueError, match=f"reference map for layer '{name}' has shape"), store.guide(bad):
            run(model, inputs)


@torch.no_grad()
def test_single_stream_layer_needs_the_text_length():
    case = CASES["flux"]
    model = case.build()
    inputs = case.inputs(model)
    store = AttentionStore()
    block = model.single_transformer_blocks[0]
    block.attn.set_processor(FluxDreamBlendProcessor(store))  # a lone instance never saw a double block
    store.bind(model)
    hidden = torch.cat([inputs["encoder_hidden_states"].new_zeros(2, N_TEXT, 32), torch.zeros(2, 16, 32)], 1)
    with store.record(), pytest.raises(RuntimeError, match="text length is unknown"):
        block.attn(hidden)


@torch.no_grad()
def test_token_beyond_the_text_block(case):
    model = case.build()
    inputs = case.inputs(model)
    with pytest.raises(ValueError, match=f"token index \\[{N_TEXT}\\] out of range.*N={N_TEXT}"):
        with attach(model, AttentionStore(tokens=[0, N_TEXT])) as store, store.record():
            run(model, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_guides_with_float32_loss(case, dtype):
    model = case.build().to(dtype)
    inputs = case.inputs(model, dtype=dtype)
    ref = perturbed_ref(case, model, inputs)
    assert all(m.dtype == torch.float32 for m in ref.values())
    loss, grad = guided_latent_grad(case, model, inputs, ref, AttentionStore())
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().max() > 0


def test_attach_refuses_processors_it_would_drop():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = CASES["sd3"].build()
    model.transformer_blocks[0].attn2.set_processor(AttnProcessor2_0())  # e.g. left by another tool
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn2.processor' uses AttnProcessor2_0"):
        with attach(model):
            pass
