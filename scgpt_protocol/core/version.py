"""The release and where it comes from; at the bottom of the house so that any module may say its version."""

__version__ = "0.1.0"
#: where the notebooks' Colab cell installs the package from, and the badges point to
REPOSITORY = "scgpt-protocol/scgpt-protocol"
