"""A pytest mark shared by the tests that call backward() on a model Opacus has hooked."""

import pytest

# the model's first trainable layer reads what needs no gradient (the images, or the fixed scattering's
# output): torch warns that its backward hook then sees no input gradient, which Opacus never reads (per-example
# gradients come from the layer's output gradient); the product filters the same message around its backward()
NO_INPUT_GRADIENT = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
