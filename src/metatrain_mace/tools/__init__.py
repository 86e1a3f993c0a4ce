"""Tools around trained models: the ``metatrain-mace`` command, export of MACE
files, the precision report, plots, and the provenance record of exported models."""
