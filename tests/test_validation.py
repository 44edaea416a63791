"""One check per kind of value, one error type per mistake, everywhere."""

import numpy as np
import pytest

from minirerank_core.errors import ConfigError, InvalidQueryError
from minirerank_core.validation import check_choice, check_positive_int, check_query, check_ratio, check_top_n


@pytest.mark.parametrize("good", [1, 5, np.int64(3), np.int32(7)])
def test_top_n_accepts_any_positive_integer(good):
    assert check_top_n(good) == int(good) and type(check_top_n(good)) is int
    assert check_top_n(None) is None


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3", True, np.float64(2.0), [1]])
def test_top_n_refuses_the_rest_with_config_error(bad):
    with pytest.raises(ConfigError, match="top_n"):
        check_top_n(bad)
    with pytest.raises(ConfigError, match="k must"):
        check_positive_int("k", bad if bad is not None else 0)


@pytest.mark.parametrize("bad", ["", "   ", None, 3, b"query"])
def test_query(bad):
    with pytest.raises(InvalidQueryError):
        check_query(bad)
    assert check_query(" q ") == " q "


def test_ratio_and_choice():
    assert check_ratio("keep_ratio", np.float32(0.5)) == 0.5 and check_ratio("keep_ratio", 1) == 1.0
    for bad in (0, 1.5, -0.1, float("nan"), "0.5", True, None):
        with pytest.raises(ConfigError, match="keep_ratio"):
            check_ratio("keep_ratio", bad)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match="mode must be one of 'a', 'b'"):
        check_choice("mode", "c", ("a", "b"))
