import pytest

from igscale.models import model_config
from igscale.models.flops import forward_macs, train_flops_per_image


@pytest.mark.parametrize("name,gmacs", [("DiT-XL/2", 118.6), ("DiT-L/2", 80.7), ("DiT-B/2", 23.0), ("DiT-S/2", 6.06),
                                         ("DiT-XL/4", 29.1)])
def test_forward_macs_match_the_dit_paper_table(name, gmacs):
    # DiT paper Table 4 "Gflops" (really GMACs) at 256 px, excluding our extra IG head
    assert forward_macs(model_config(name), include_ig_heads=False) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_training_flops_convention():
    assert train_flops_per_image(model_config("SiT-XL/2")) / 1e9 == pytest.approx(712, rel=0.005)
