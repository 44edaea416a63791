"""ImportanceMap: validated once, carries its grid; Candidates from pages, maps by position or by id."""

import numpy as np
import pytest
import torch

from minirerank_core import Candidate, ImportanceMap, InvalidImportanceError, Page
from minirerank_core.candidates import as_candidates
from minirerank_core.testing import random_page_image


def test_map_carries_its_grid_and_round_trips_through_json():
    m = ImportanceMap(torch.arange(6.0).reshape(2, 3))
    assert m.grid == (2, 3) and m.flat().tolist() == [0, 1, 2, 3, 4, 5]
    again = ImportanceMap.from_json(json_round_trip(m.to_json()))
    assert again.grid == (2, 3) and torch.equal(again.values, m.values)


def json_round_trip(obj):
    import json

    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("value, grid", [
    (np.full((2, 3), np.nan), (2, 3)),             # not finite
    ([0.0, float("inf"), 0, 0, 0, 0], (2, 3)),      # not finite, flat
    (np.zeros((3, 2)), (2, 3)),                     # transposed: right size, wrong shape
    (np.zeros(5), (2, 3)),                          # flat, wrong length
    (np.zeros((2, 3, 1)), (2, 3)),                  # 3-D
    (ImportanceMap(torch.zeros(3, 2)), (2, 3)),     # a map on another grid
    ("abc", (2, 3)),                                # not numeric
])
def test_bad_maps_are_refused_naming_the_page(value, grid):
    with pytest.raises(InvalidImportanceError, match="page 'p7'"):
        ImportanceMap.coerce(value, grid, page="page 'p7'")


def test_good_maps_are_accepted_flat_or_2d():
    flat = ImportanceMap.coerce([1, 2, 3, 4, 5, 6], (2, 3))
    two_d = ImportanceMap.coerce(np.arange(1, 7).reshape(2, 3), (2, 3))
    assert torch.equal(flat.values, two_d.values) and flat.values.dtype == torch.float32


def test_as_candidates_fills_maps_by_position_or_by_id():
    pages = [Page(random_page_image(40, 40, seed=i), id=f"p{i}") for i in range(3)]
    maps = {"p1": [1.0]}
    cands = as_candidates(pages, maps)
    assert [c.importance for c in cands] == [None, [1.0], None]
    given = Candidate(pages[0], first_stage_score=3.0, importance=[2.0])
    (c,) = as_candidates([given], [[9.0]])
    assert c.importance == [2.0] and c.first_stage_score == 3.0  # a candidate's own map is kept
    (c,) = as_candidates([Candidate(pages[0])], [[9.0]])
    assert c.importance == [9.0]
    with pytest.raises(InvalidImportanceError, match="2 maps for 3 pages"):
        as_candidates(pages, [[1.0], [2.0]])
