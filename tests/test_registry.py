"""finegrain.registry: unknown names get close suggestions."""

from __future__ import annotations

import pytest

from finegrain.models.attention import ATTENTIONS
from finegrain.models.pooling import POOLINGS


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="compact_bilinear"):
        POOLINGS.get("compact-bilinear")
    with pytest.raises(ValueError, match="cbam"):
        ATTENTIONS.get("cbm")
