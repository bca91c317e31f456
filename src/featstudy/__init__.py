"""featstudy: how every feature of a pretrained CNN behaves when used as a feature extractor.

Reproduces and extends Garcia-Gasulla et al. (2017), "On the Behavior of Convolutional Nets for
Feature Extraction" (arXiv:1703.01127).
"""

__version__ = "0.1.0"
