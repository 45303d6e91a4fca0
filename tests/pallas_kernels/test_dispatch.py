"""pallas_kernels.dispatch: which implementation runs, and Triton tile sizes."""

import pytest

from pallas_kernels import dispatch


def test_on_cpu_the_reference_runs_unless_interpret_or_an_implementation_is_asked():
    assert dispatch.pick_implementation("op", None, False, tpu_ok=True) == "xla"
    assert dispatch.pick_implementation("op", None, True, tpu_ok=True) == "tpu"
    assert dispatch.pick_implementation("op", None, True, tpu_ok=False) == "gpu"
    assert dispatch.pick_implementation("op", "gpu", False, tpu_ok=True) == "gpu"


def test_an_unknown_implementation_is_named_in_the_error():
    with pytest.raises(ValueError, match="my_op implementation='cuda'"):
        dispatch.pick_implementation("my_op", "cuda", False, tpu_ok=True)


@pytest.mark.parametrize("b,ok", [(16, True), (64, True), (8, False), (48, False), (True, False)])
def test_tile_sizes_are_powers_of_two_from_16(b, ok):
    assert dispatch.is_tile_size(b) is ok


@pytest.mark.parametrize(
    "block,size,want", [(64, 1, 16), (64, 33, 64), (64, 1000, 64), (128, 20, 32)]
)
def test_clamp_tile_covers_small_sizes_with_the_smallest_tile(block, size, want):
    assert dispatch.clamp_tile(block, size) == want
