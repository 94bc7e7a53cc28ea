"""Model level: the whole GPT-2 with LoRA against the reference. One test per feature."""

import pytest

from conformance.features import MODEL_FEATURES

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("feature", MODEL_FEATURES, ids=[f.id for f in MODEL_FEATURES])
def test_model(conformance_suite, conformance_record, feature):
    conformance_suite.run_feature(feature, conformance_record)
