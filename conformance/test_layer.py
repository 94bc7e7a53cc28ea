"""Layer level: one LoRA layer (Linear and Conv1D layouts) against the reference. One test per feature."""

import pytest

from conformance.features import LAYER_FEATURES

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("feature", LAYER_FEATURES, ids=[f.id for f in LAYER_FEATURES])
def test_layer(conformance_suite, conformance_record, feature):
    conformance_suite.run_feature(feature, conformance_record)
