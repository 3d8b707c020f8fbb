"""Shapes, input validation, sizes and parameter groups of the ConvNeXt U-Net."""

from __future__ import annotations

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model import ModelConfig, SegmentationGraph, build_model, count_parameters


@pytest.fixture(scope="module")
def model(make_tiny):
    return make_tiny(n_classes=5).eval()


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("base", fm_kind="timm:uni", fm_dim=1024, use_patch_grid=True, n_classes=6)
    return build_model(config)


@pytest.mark.parametrize("size", [64, 96, 128, (64, 160)])
@pytest.mark.parametrize("batch", [1, 2])
def test_output_shapes(model, make_images, size, batch):
    x = make_images(batch, size)
    height, width = x.shape[-2:]
    with torch.no_grad():
        out = model(x, torch.randint(0, 1000, (batch,)), mask=torch.zeros(batch, 1, height, width))
        segmentation = model.segment(x)
    assert out.prediction.shape == x.shape
    channels = (16, 32, 64, 128)  # tiny: full_res_width, then widths at 1/4, 1/8, 1/16
    strides = (1, 4, 8, 16)
    assert [tuple(f.shape) for f in out.features] == [
        (batch, c, height // s, width // s) for c, s in zip(channels, strides)
    ]
    assert segmentation["np"].shape == (batch, 2, height, width)
    assert segmentation["hv"].shape == (batch, 2, height, width)
    assert segmentation["nc"].shape == (batch, 5, height, width)


def test_one_logit_np_and_no_nc_head(make_tiny, make_images):
    with torch.no_grad():
        out = make_tiny(np_channels=1).segment(make_images(1))
    assert out["np"].shape == (1, 1, 64, 64)
    assert out["nc"] is None


def test_heads_at_half_resolution_give_full_resolution_outputs_from_the_same_weights(make_tiny, make_images):
    full, half = make_tiny(n_classes=3).eval(), make_tiny(n_classes=3, head_stride=2).eval()
    half.load_state_dict(full.state_dict())  # head_stride changes no weight's shape
    conv_inputs = []
    half.heads.np[0].register_forward_hook(lambda module, args, out: conv_inputs.append(args[0].shape))
    x = make_images(2, (64, 96))
    with torch.no_grad():
        outputs = {name: model.segment(x) for name, model in (("full", full), ("half", half))}
    assert conv_inputs == [(2, 32, 32, 48)]
    for task, channels in (("np", 2), ("hv", 2), ("nc", 3)):
        assert outputs["half"][task].shape == outputs["full"][task].shape == (2, channels, 64, 96)
        assert not torch.allclose(outputs["half"][task], outputs["full"][task])


def test_separable_heads_split_each_3x3_conv_into_depthwise_and_pointwise(make_tiny, make_images):
    dense, separable = make_tiny(n_classes=3).eval(), make_tiny(n_classes=3, head_conv="separable").eval()
    backbone = {k: v for k, v in dense.state_dict().items() if dense.group_of(k) != "heads"}
    assert backbone.keys() <= separable.state_dict().keys()
    separable.load_state_dict({**separable.state_dict(), **backbone})
    depthwise = [m for m in separable.heads.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 6 and all(m.kernel_size == (3, 3) and m.groups == m.in_channels for m in depthwise)
    assert not any(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1 for m in separable.heads.modules()
    )
    heads = [sum(p.numel() for p in model.heads.parameters()) for model in (dense, separable)]
    assert heads[1] < heads[0] / 2
    x = make_images(2, (64, 96))
    with torch.no_grad():
        out = separable.segment(x)
    for task, channels in (("np", 2), ("hv", 2), ("nc", 3)):
        assert out[task].shape == (2, channels, 64, 96) and torch.isfinite(out[task]).all()


def test_heads_of_one_scale_read_only_the_full_resolution_map(make_tiny):
    fused_all, fused_one = make_tiny().eval(), make_tiny(head_scales=1).eval()
    assert len(fused_one.heads.projections) == 1 and len(fused_all.heads.projections) == 4
    torch.manual_seed(0)
    widths = (fused_all.config.full_res_width, *fused_all.config.widths[:3])
    features = [torch.randn(1, w, 64 // s, 64 // s) for w, s in zip(widths, (1, 4, 8, 16))]
    coarse_changed = [features[0], *(f + 1.0 for f in features[1:])]
    with torch.no_grad():
        assert torch.equal(fused_one.heads(features)["np"], fused_one.heads(coarse_changed)["np"])
        assert not torch.allclose(fused_all.heads(features)["np"], fused_all.heads(coarse_changed)["np"])


def test_unknown_head_settings_are_refused():
    with pytest.raises(CmdfedError, match="head_conv must be one of"):
        ModelConfig.from_preset("tiny", head_conv="dilated")
    with pytest.raises(CmdfedError, match="head_scales must be 1 to 4"):
        ModelConfig.from_preset("tiny", head_scales=5)


@pytest.mark.parametrize("size", [(65, 64), (64, 48), (16, 64)])
def test_sides_must_be_multiples_of_32(model, size):
    with pytest.raises(CmdfedError, match="multiples of 32"):
        model.segment(torch.zeros(1, 3, *size))


def test_rejects_wrong_channels_dtype_mask_t_and_fm(model, make_fm):
    with pytest.raises(CmdfedError, match="3 image channels"):
        model.segment(torch.zeros(1, 4, 64, 64))
    with pytest.raises(CmdfedError, match="float32"):
        model.segment(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(CmdfedError, match="float32"):
        model.segment(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(CmdfedError, match="mask must have shape"):
        model(torch.zeros(2, 3, 64, 64), 5, mask=torch.zeros(2, 64, 64))
    with pytest.raises(CmdfedError, match="t must be"):
        model(torch.zeros(2, 3, 64, 64), torch.tensor([1, 2, 3]))
    with pytest.raises(CmdfedError, match="no FM conditioning"):
        model.segment(torch.zeros(2, 3, 64, 64), fm=make_fm(2, 8))


def test_fm_model_requires_matching_features(make_tiny, make_images, make_fm):
    model = make_tiny(fm_kind="hf:/somewhere", fm_dim=8, use_patch_grid=True)
    x = make_images(2)
    with pytest.raises(CmdfedError, match="pass fm="):
        model.segment(x)
    with pytest.raises(CmdfedError, match="fm features must be"):
        model.segment(x, fm=make_fm(2, 16))
    assert model.segment(x, fm=make_fm(2, 8))["np"].shape == (2, 2, 64, 64)


def test_segmentation_graph_is_segment_with_tensor_inputs(make_tiny, make_images, make_fm):
    model = make_tiny(fm_kind="hf:/somewhere", fm_dim=8, use_patch_grid=True, n_classes=3).eval()
    x, fm = make_images(2), make_fm(2, 8)
    with torch.no_grad():
        expected = model.segment(x, fm)
        outputs = SegmentationGraph(model)(x, fm.cls, fm.patch_mean, fm.patch_grid)
    assert len(outputs) == 3
    for output, key in zip(outputs, ("np", "hv", "nc")):
        assert torch.equal(output, expected[key])


def test_tiny_is_under_five_million_parameters(make_tiny):
    _, total = count_parameters(make_tiny(n_classes=6, fm_kind="hf:/fm", fm_dim=1024, use_patch_grid=True))
    assert total < 5_000_000


def test_base_encoder_is_convnext_tiny(base_model):
    assert [len(stage) for stage in base_model.stages] == [3, 3, 9, 3]
    assert [stage[0].dwconv.in_channels for stage in base_model.stages] == [96, 192, 384, 768]
    encoder = sum(
        p.numel()
        for name, p in base_model.named_parameters()
        if name.startswith(("stem.", "stages.", "downsamples.")) and base_model.group_of(name) == "backbone"
    )
    # ConvNeXt-T without its classifier has 27,818,592 parameters; this stem also reads the mask
    # channel: 96 output channels x 4 x 4 kernel = 1,536 more.
    assert encoder == 27_818_592 + 96 * 16


def test_heads_and_modulation_within_five_percent_of_base(base_model):
    parameters = dict(base_model.named_parameters())
    sizes = {g: sum(parameters[n].numel() for n in names) for g, names in base_model.parameter_groups().items()}
    base_model.freeze(["backbone"])
    try:
        trainable, total = count_parameters(base_model)
    finally:
        base_model.unfreeze(["backbone"])
    assert total == sum(sizes.values())
    assert trainable == sizes["heads"] + sizes["modulation"]
    assert sizes["heads"] / total <= 0.05
    assert trainable / total <= 0.05


def test_parameter_groups_partition_the_model(model):
    groups = model.parameter_groups()
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith("heads.") for n in groups["heads"])
    assert "stages.0.0.modulation.vector.1.weight" in groups["modulation"]
    assert "conditioning.timestep.mlp.0.weight" in groups["modulation"]
    assert "stages.0.0.dwconv.weight" in groups["backbone"]
    assert "final_layer.linear.weight" in groups["backbone"]


def test_partial_state_dict_moves_only_the_named_groups(make_tiny, perturb):
    source = perturb(make_tiny(seed=1), seed=1)
    target = make_tiny(seed=2)
    backbone_before = {k: v.clone() for k, v in target.state_dict_for(["backbone"]).items()}
    sent = source.state_dict_for(["heads", "modulation"])
    assert sent and {target.group_of(k) for k in sent} == {"heads", "modulation"}

    target.load_partial_state_dict(sent, ["heads", "modulation"])

    for key, value in target.state_dict_for(["heads", "modulation"]).items():
        assert torch.equal(value, sent[key])
    for key, value in target.state_dict_for(["backbone"]).items():
        assert torch.equal(value, backbone_before[key])


def test_partial_state_dict_rejects_mismatches(make_tiny):
    model = make_tiny()
    heads = model.state_dict_for(["heads"])
    dropped = min(heads)
    del heads[dropped]
    with pytest.raises(CmdfedError, match=dropped.replace(".", r"\.")):
        model.load_partial_state_dict(heads, ["heads"])
    with pytest.raises(CmdfedError, match="unexpected"):
        model.load_partial_state_dict(model.state_dict_for(["heads", "modulation"]), ["heads"])
    with pytest.raises(CmdfedError, match="wrong shape"):
        model.load_partial_state_dict(make_tiny(head_width=48).state_dict_for(["heads"]), ["heads"])
    with pytest.raises(CmdfedError, match="unknown parameter groups"):
        model.state_dict_for(["decoder"])


def test_frozen_groups_get_no_gradients(make_tiny, make_images):
    model = make_tiny()
    model.freeze(["backbone", "modulation"])
    outputs = model.segment(make_images(2))
    (outputs["np"].mean() + outputs["hv"].mean()).backward()
    for name, parameter in model.named_parameters():
        if model.group_of(name) == "heads":
            assert parameter.grad is not None
        else:
            assert parameter.grad is None and not parameter.requires_grad
    assert count_parameters(model)[0] == sum(p.numel() for p in model.heads.parameters())
