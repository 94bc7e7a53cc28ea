"""Merge at model level, DoRA, initialisations, several adapters, weighted combinations (docs/advanced-semantics.md)
against the reference. One test per feature; cases and checks in conformance/advanced.py."""

import pytest

from conformance.advanced import run_feature
from conformance.features import ADVANCED_FEATURES

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("feature", ADVANCED_FEATURES, ids=[f.id for f in ADVANCED_FEATURES])
def test_advanced(conformance_suite, conformance_record, feature):
    run_feature(conformance_suite, feature, conformance_record)
