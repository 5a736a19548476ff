import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def assert_close_to_reference(actual, expected, rtol, min_scale=1e-30):
    """Elementwise |actual - expected| <= rtol * max(max|expected|, min_scale): relative error
    at the scale of the tensor, so entries that should be ~0 are not held to an impossible
    relative bound."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, min_scale))
