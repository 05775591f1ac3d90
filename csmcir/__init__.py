"""csmcir: composed image retrieval with a symmetric shared Q-Former dual tower."""

__version__ = "0.1.0"
