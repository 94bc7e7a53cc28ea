"""pytest plugin placeholder (filled by the conformance suite)."""
