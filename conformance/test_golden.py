"""The committed golden fixtures (golden/manifest.json), replayed as fixed regression points. One test each."""

import pytest

from conformance.suite import golden_fixtures

pytestmark = pytest.mark.conformance


def pytest_generate_tests(metafunc):
    if "golden_fixture" in metafunc.fixturenames:
        fixtures = golden_fixtures(metafunc.config.getoption("conformance_golden_dir"))
        if fixtures:
            metafunc.parametrize("golden_fixture", fixtures, ids=[name for name, _ in fixtures])
        else:
            metafunc.parametrize("golden_fixture", [None], ids=["no-manifest"])


def test_golden(conformance_suite, conformance_record, golden_fixture):
    if golden_fixture is None:
        folder = conformance_suite.golden_dir or "golden/"
        pytest.skip(
            f"no golden fixtures: {folder}/manifest.json is absent (pass --golden-dir DIR or set "
            "$REFLORA_GOLDEN_DIR to a folder holding golden/'s manifest.json and fixtures/)"
        )
    conformance_suite.run_golden(golden_fixture[1], conformance_record)
