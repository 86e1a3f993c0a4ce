"""Helpers shared by the tests: generated datasets, MACE files, option builders.

``tests/`` is on ``sys.path`` (pytest puts the folder of the root ``conftest.py``
there), so the tests import these as ``helpers.<module>``.
"""
