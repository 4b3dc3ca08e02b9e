"""cellkd: nucleus segmentation and knowledge-distilled nucleus classification in H&E whole-slide images."""

__version__ = "0.1.0"
