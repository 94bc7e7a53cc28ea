"""Merge at model level, DoRA, initialisations, several adapters, weighted combinations (docs/advanced-semantics.md)
against the reference. One test per feature; drawn by conformance/strategies.py, checked by conformance/checks.py."""

import pytest

from conformance.features import ADVANCED_FEATURES

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("feature", ADVANCED_FEATURES, ids=[f.id for f in ADVANCED_FEATURES])
def test_advanced(conformance_suite, conformance_record, feature):
    conformance_suite.run_feature(feature, conformance_record)
