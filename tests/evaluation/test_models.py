"""The harness's models: each one's output shape for every dataset's input size, and the
paper's models checked against the official UNSC definitions (parameter counts and layer
shapes taken from instantiating the official code; MNIST-1D's from its notebooks)."""
import pytest
import torch
from torch import nn

from unsc_fast.evaluation.models import MODELS, create_model

# (model, classes, input shape): the paper's pairs, their 28x28 / grey variants, MNIST-1D, digits.
CASES = [
    ("allcnn", 10, (3, 32, 32)), ("allcnn", 10, (1, 28, 28)),
    ("resnet18", 100, (3, 32, 32)), ("resnet18", 10, (1, 28, 28)),
    ("vgg11", 10, (3, 32, 32)), ("vgg11", 10, (1, 28, 28)),
    ("alexnet", 10, (1, 28, 28)), ("alexnet", 10, (1, 32, 32)), ("alexnet", 10, (3, 32, 32)),
    ("mnist1d_cnn", 10, (1, 40)), ("mnist1d_mlp", 10, (1, 40)),
    ("digits_cnn", 10, (1, 8, 8)),
]

# Parameter counts of the official models (models/*.py of the UNSC code, as its utils.get_model
# builds them: AllCNN with filters_percentage=0.5, vgg11_bn, AlexNet, resnet18) and of MNIST-1D's
# ConvBase / MLPBase (5,210 and 15,210 as its notebooks print).
OFFICIAL_PARAMETERS = [
    ("allcnn", 10, (3, 32, 32), 406_810), ("allcnn", 10, (1, 28, 28), 405_946),
    ("vgg11", 10, (3, 32, 32), 28_149_514),
    ("alexnet", 10, (1, 28, 28), 6_526_848), ("alexnet", 10, (3, 32, 32), 6_528_896),
    ("resnet18", 10, (3, 32, 32), 11_173_962), ("resnet18", 100, (3, 32, 32), 11_220_132),
    ("mnist1d_cnn", 10, (1, 40), 5_210), ("mnist1d_mlp", 10, (1, 40), 15_210),
]


@pytest.mark.parametrize("name,classes,shape", CASES)
def test_forward_shape_for_each_input_size(name, classes, shape):
    torch.manual_seed(0)
    model = create_model(name, classes, shape).eval()
    assert model(torch.randn(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize("name,classes,shape,expected", OFFICIAL_PARAMETERS)
def test_parameter_counts_match_the_official_definitions(name, classes, shape, expected):
    assert sum(p.numel() for p in create_model(name, classes, shape).parameters()) == expected


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_allcnn_is_the_papers_48_96_network_with_every_conv_padded():
    convs = _convs(create_model("allcnn", 10, (3, 32, 32)))
    assert [n for n, _ in convs] == [f"features.{i}.0" for i in (0, 1, 2, 4, 5, 6, 8, 9)]  # official names
    assert [m.out_channels for _, m in convs] == [48, 48, 96, 96, 96, 96, 96, 96]
    assert [m.stride[0] for _, m in convs] == [1, 1, 2, 1, 1, 2, 1, 1]
    assert [m.padding[0] for _, m in convs] == [1, 1, 1, 1, 1, 1, 1, 0]  # the 7th 3x3 keeps padding 1
    assert [m.kernel_size[0] for _, m in convs] == [3] * 7 + [1]
    assert all(m.bias is None for _, m in convs)


def test_state_dict_names_follow_the_official_code():
    """An official checkpoint's state_dict loads as is: same names, same shapes (samples)."""
    expected = {
        "allcnn": {"features.9.0.weight": (96, 96, 1, 1), "features.9.1.running_var": (96,), "fc.0.weight": (10, 96)},
        "vgg11": {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,), "features.25.weight": (512, 512, 3, 3),
                  "fc.0.weight": (4096, 512), "fc.6.weight": (10, 4096)},
        "alexnet": {"features.0.weight": (64, 1, 4, 4), "features.10.weight": (256, 128, 2, 2),
                    "fc.0.weight": (2048, 1024), "fc.1.running_mean": (2048,), "fc.8.weight": (10, 2048)},
        "resnet18": {"features.0.weight": (64, 3, 3, 3), "features.3.0.residual_function.0.weight": (64, 64, 3, 3),
                     "features.4.0.shortcut.0.weight": (128, 64, 1, 1), "features.6.1.residual_function.4.weight": (512,),
                     "fc.weight": (10, 512)},
    }
    shapes = {"allcnn": (3, 32, 32), "vgg11": (3, 32, 32), "alexnet": (1, 28, 28), "resnet18": (3, 32, 32)}
    for name, entries in expected.items():
        state = create_model(name, 10, shapes[name]).state_dict()
        assert {key: tuple(state[key].shape) for key in entries} == entries, name
    assert "fc.8.bias" not in create_model("alexnet", 10, (1, 28, 28)).state_dict()  # bias-free head


def test_vgg11_at_32x32_ends_on_a_1x1_map_as_the_official_one():
    model = create_model("vgg11", 10, (3, 32, 32)).eval()
    assert model.features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_mnist1d_cnn_is_convbase():
    model = create_model("mnist1d_cnn", 10, (1, 40))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs] == \
        [(25, 5, 2, 1), (25, 3, 2, 1), (25, 3, 2, 1)]
    assert model.fc.in_features == 125


def test_models_refuse_the_wrong_kind_of_input():
    with pytest.raises(ValueError, match=r"\(C, H, W\) images"):
        create_model("allcnn", 10, (1, 40))
    with pytest.raises(ValueError, match=r"\(C, L\) signals"):
        create_model("mnist1d_cnn", 10, (1, 28, 28))
    with pytest.raises(ValueError, match="at least 23x23"):
        create_model("alexnet", 10, (1, 16, 16))
    with pytest.raises(KeyError, match="unknown model"):
        create_model("lenet", 10, (1, 28, 28))


def test_cli_lists_every_model():
    from unsc_fast.evaluation.cli import MODEL_NAMES

    assert set(MODEL_NAMES) == set(MODELS)


@pytest.mark.parametrize("name,shape", [("allcnn", (3, 32, 32)), ("vgg11", (3, 32, 32)),
                                        ("alexnet", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_unsc_tracks_every_weight_layer_of_the_paper_models(name, shape):
    from unsc_fast import NullSpaceProjector

    model = create_model(name, 10, shape)
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(NullSpaceProjector(model).layers) == expected  # shortcut convs and bias-free heads included


@pytest.mark.slow  # six eigendecompositions of 864 x 864 covariances (~10-30 s on a shared CPU)
def test_unsc_builds_a_basis_for_every_allcnn_layer():
    from unsc_fast import NullSpaceProjector

    torch.manual_seed(0)
    model = create_model("allcnn", 10, (3, 32, 32)).eval()
    projector = NullSpaceProjector(model, threshold=0.95)
    with projector.observe(labels=torch.arange(2)):
        model(torch.randn(2, 3, 32, 32))
    projector.build(exclude=(1,))
    assert set(projector.ranks()) == set(projector.layers)
    assert projector.basis("features.6.0").shape[0] == 96 * 9  # a conv's rows are (in x kh x kw) patches
