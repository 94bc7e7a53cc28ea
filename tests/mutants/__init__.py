"""Deliberately wrong LoRA candidates, written as ordinary drivers (see catalog.py).

tests/test_conformance_mutants.py runs the conformance suite against each one and asserts that it fails on
the features the bug touches. They import as ``mutants.catalog:<Class>`` with tests/ on ``sys.path``.
"""
