"""Student's t quantile against table values (to 4 decimals) and its argument checks."""
import pytest

from keepbits.core.stats import t_quantile


@pytest.mark.parametrize("dof, p, expected", [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (3, 0.975, 3.1824), (8, 0.975, 2.3060),
                                              (30, 0.975, 2.0423), (1000, 0.975, 1.9623), (5, 0.95, 2.0150), (10, 0.995, 3.1693)])
def test_quantiles_match_the_tables(dof, p, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p, dof", [(0.5, 3), (1.0, 3), (0.975, 0), (0.975, float("nan"))])
def test_outside_its_domain_is_an_error(p, dof):
    with pytest.raises(ValueError, match="need 0.5 < p < 1 and dof >= 1"):
        t_quantile(p, dof)
