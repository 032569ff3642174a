"""Tests for tasks.models: shapes, sizes, buffers (only ResNet-18 has any), seeded initialisation."""

import pytest
import torch
from torch import nn

from tasks.models import available_models, build_model, count_parameters, default_model_for

NATIVE_SHAPES = {
    "digits-cnn": (1, 8, 8),
    "digits-bn-cnn": (1, 8, 8),
    "mnist1d-cnn": (1, 40),
    "mnist1d-mlp": (1, 40),
    "transformer": (1, 40),
    "mnist-cnn": (1, 28, 28),
    "cifar-cnn": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "logreg": (1, 8, 8),
}
#: Models with BatchNorm buffers (fl_compams.buffers carries them).
WITH_BUFFERS = {"resnet18", "digits-bn-cnn"}


def test_every_model_has_a_native_shape_here():
    assert set(available_models()) == set(NATIVE_SHAPES)


@pytest.mark.parametrize("name", sorted(set(NATIVE_SHAPES) - {"resnet18"}))  # ResNet-18: its own test
@pytest.mark.parametrize("num_classes", [10, 7])
def test_forward_gives_batch_by_classes(name, num_classes):
    shape = NATIVE_SHAPES[name]
    model = build_model(name, num_classes, shape, seed=0)
    out = model(torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(NATIVE_SHAPES) - WITH_BUFFERS))
def test_models_have_no_buffers_and_no_batchnorm(name):
    model = build_model(name, 10, NATIVE_SHAPES[name])
    assert list(model.buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # every state-dict entry is a trainable parameter
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_parameter_counts():
    digits = count_parameters(build_model("digits-cnn", 10, (1, 8, 8)))
    assert digits >= 100_000
    assert digits == 151_306  # 320 + 18,496 + 131,200 + 1,290
    assert count_parameters(build_model("mnist-cnn", 10, (1, 28, 28))) == 1_199_882  # fc1 is 9216 -> 128
    assert count_parameters(build_model("cifar-cnn", 10, (3, 32, 32))) == 620_362
    assert count_parameters(build_model("logreg", 10, (1, 8, 8))) == 650
    # ConvBase of the MNIST-1D repository: conv 1->25 k5 (150), 25->25 k3 (1,900) twice, fc 125 -> 10 (1,260)
    assert count_parameters(build_model("mnist1d-cnn", 10, (1, 40))) == 5_210
    assert count_parameters(build_model("logreg", 10, (1, 40))) == 410
    # MLP 40 -> 256 -> 256 -> 10: 10,496 + 65,792 + 2,570; Top-k 1 % keeps 789 values
    assert count_parameters(build_model("mnist1d-mlp", 10, (1, 40))) == 78_858
    # patch embedding 4 -> 32 (160) + positions 10 x 32 (320) + 2 layers x 8,544 + norm (64) + head (330)
    assert count_parameters(build_model("transformer", 10, (1, 40))) == 17_962


def test_resnet18_is_torchvisions_with_the_cifar_stem_and_batchnorm_buffers():
    model = build_model("resnet18", 10, (3, 32, 32), seed=0)
    assert count_parameters(model) == 11_173_962
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity) and model.fc.out_features == 10
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and sum(m.num_features for m in bns) == 4_800
    buffers = dict(model.named_buffers())
    assert (
        sum(b.numel() for b in buffers.values()) == 2 * 4_800 + 20
    )  # running mean and var, one counter each
    assert {b.dtype for n, b in buffers.items() if n.endswith("num_batches_tracked")} == {torch.int64}
    # the stem keeps 32x32 through layer1 (no stride, no max-pool): layer4 works on 4x4
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)) and None)
    out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert seen == [(1, 512, 4, 4)] and out.shape == (1, 10)


def test_digits_bn_cnn_is_digits_cnn_with_batchnorm():
    model = build_model("digits-bn-cnn", 10, (1, 8, 8), seed=0)
    assert count_parameters(model) == 151_306 + 2 * (32 + 64)
    assert sum(b.numel() for b in model.buffers()) == 2 * (32 + 64) + 2
    assert [type(m).__name__ for m in model][:5] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]


def test_resnet18_seeded_init_repeats_and_replaced_stem_follows_the_seed():
    a = build_model("resnet18", 10, (3, 32, 32), seed=5).state_dict()
    b = build_model("resnet18", 10, (3, 32, 32), seed=5).state_dict()
    c = build_model("resnet18", 10, (3, 32, 32), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    with pytest.raises(ValueError, match="8x8"):
        build_model("resnet18", 10, (3, 4, 4))


def test_shapes_adapt_where_meaningful():
    assert build_model("logreg", 3, (3, 5, 7))(torch.zeros(2, 3, 5, 7)).shape == (2, 3)
    assert build_model("digits-cnn", 4, (3, 12, 10))(torch.zeros(2, 3, 12, 10)).shape == (2, 4)
    assert build_model("mnist-cnn", 10, (3, 28, 28))(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    assert build_model("cifar-cnn", 100, (1, 32, 32))(torch.zeros(2, 1, 32, 32)).shape == (2, 100)
    assert build_model("mnist1d-cnn", 3, (2, 100))(torch.zeros(2, 2, 100)).shape == (2, 3)
    assert build_model("mnist1d-cnn", 10, (1, 3))(torch.zeros(2, 1, 3)).shape == (2, 10)
    assert build_model("logreg", 10, (1, 40))(torch.zeros(2, 1, 40)).shape == (2, 10)
    # a length that is not a multiple of the patch size is padded; channels join the patch
    assert build_model("transformer", 3, (2, 37))(torch.zeros(2, 2, 37)).shape == (2, 3)
    assert build_model("mnist1d-mlp", 4, (2, 10))(torch.zeros(2, 2, 10)).shape == (2, 4)


def test_transformer_attends_across_positions():
    """The logits depend on every patch: a change confined to the last patch moves the prediction."""
    model = build_model("transformer", 10, (1, 40), seed=0).eval()
    x = torch.randn(4, 1, 40, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[..., 36:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(x), model(y))


@pytest.mark.parametrize("name", ["mnist1d-mlp", "transformer"])
def test_new_mnist1d_models_fit_a_small_batch(name):
    """Sanity of the whole parameter vector: 150 Adam steps memorise 64 random signals (loss falls 5x)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    model = build_model(name, 10, (1, 40), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)  # dropout masks
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


def test_mnist1d_cnn_is_the_repositorys_convbase():
    model = build_model("mnist1d-cnn", 10, (1, 40), seed=0)
    convs = [m for m in model if isinstance(m, nn.Conv1d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs] == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 3
    (fc,) = [m for m in model if isinstance(m, nn.Linear)]
    assert (fc.in_features, fc.out_features) == (125, 10)  # 25 channels x length 5 (40 -> 19 -> 10 -> 5)
    x = torch.randn(8, 1, 40, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("mnist-cnn", (1, 8, 8), "28x28"),
        ("cifar-cnn", (1, 28, 28), "32x32"),
        ("digits-cnn", (1, 1, 8), "2x2"),
        ("digits-cnn", (1, 40), r"\(C, H, W\)"),
        ("mnist-cnn", (1, 40), "28x28"),
        ("mnist1d-cnn", (1, 8, 8), r"\(C, L\)"),
        ("mnist1d-cnn", (1, 2), "length >= 3"),
    ],
)
def test_input_shape_mismatch_raises(name, shape, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, shape)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="digits-cnn"):
        build_model("resnet50", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("logreg", 1, (1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        build_model("logreg", 10, ())
    with pytest.raises(ValueError, match="input_shape"):
        build_model("logreg", 10, (1, 0, 8))


def test_default_models():
    assert default_model_for("digits") == "digits-cnn"
    assert default_model_for("mnist1d") == "mnist1d-cnn"
    assert default_model_for("mnist") == "mnist-cnn"
    assert default_model_for("fashion-mnist") == "mnist-cnn"
    assert default_model_for("cifar10") == "cifar-cnn"
    with pytest.raises(ValueError, match="cifar10"):
        default_model_for("imdb")


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = build_model("digits-cnn", 10, (1, 8, 8), seed=3).state_dict()
    b = build_model("digits-cnn", 10, (1, 8, 8), seed=3).state_dict()
    c = build_model("digits-cnn", 10, (1, 8, 8), seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
