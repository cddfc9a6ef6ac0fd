"""cxrlab: chest X-ray classification from a folder of images to an evaluated, explained, served model."""

__version__ = "0.1.0"

RESEARCH_NOTICE = "For research use only: not a medical device and not for diagnosis."
