"""subjectpairs: the BLIP-Diffusion subject-pair corpus, rebuilt and trained on."""

__version__ = "0.1.0"
